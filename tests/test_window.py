"""Sliding-window attention (window_size=(left, right), -1 = unbounded, with or without causal) on the
CPU kernels, the CUDA kernels (host emulation), the plain API and the ring, against the float64
reference (its own naive mask); the mask as a value (ringattn.mask) and the ring steps it needs."""
import numpy as np
import pytest

import ringattn
from mpi_util import run_file
from ringattn import kernels as K
from ringattn import reference as R
from fake_device import FakeDeviceArray
from ringattn.mask import Mask, ring_steps
from test_cuda_emulated import cuda, monkeypatch_module  # noqa: F401  (fixtures: the emulated CUDA module)

TOL = {np.float32: 1e-5, np.float64: 1e-12}
# 0, 1, shorter than a kernel tile, longer than a tile, longer than the sequence; one- and two-sided
WINDOWS = [(0, 0), (1, -1), (0, -1), (5, 3), (-1, 2), (17, 40), (70, 0), (300, 300), (-1, -1)]
SHAPES = [(1, 97, 130, 4, 2, 59), (2, 150, 45, 2, 1, 16), (1, 1, 70, 3, 1, 5), (1, 200, 200, 2, 2, 8)]


def inputs(rng, shape, dtype):
    b, sq, sk, h, hk, d = shape
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d),
                                                                (b, sq, h, d)))


def close(got, ref, tol, what, zero_scale=None):
    """Non-finite elements (rows that see nothing: lse -inf) equal; the rest within tol (relative).
    A reference that is exactly 0 (window (0, 0): one visible key, so dq = dk = 0 by cancellation,
    dS = p (dp - delta) with delta = dp) has no relative error: there every element must be within 16
    rounding errors of the cancelled terms' bound `zero_scale`."""
    eps = np.finfo(np.asarray(got).dtype).eps
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isfinite(got), fin) and np.array_equal(got[~fin], ref[~fin]), f"{what}: non-finite set"
    if fin.any() and zero_scale is not None and not ref[fin].any():
        worst = np.abs(got[fin]).max()
        assert worst <= 16 * eps * zero_scale, f"{what}: {worst:.2e} where the reference is 0"
    elif fin.any():
        err = R.rel_error(got[fin], ref[fin])
        assert err < tol, f"{what}: rel error {err:.2e}"


def cancelled_scale(q, k, v, dout):
    """Bound of the terms a gradient element sums: scale * |dp| * |k or q| (|dp| <= d max|dout| max|v|)."""
    d = q.shape[-1]
    dp = d * np.abs(dout).max() * np.abs(v).max()
    return d * dp * max(np.abs(k).max(), np.abs(q).max()) / np.sqrt(d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_api_window_matches_reference(shape, window, causal, dtype):
    rng = np.random.default_rng()
    q, k, v, dout = inputs(rng, shape, dtype)
    out, lse = ringattn.attention_forward(q, k, v, causal=causal, window_size=window)
    grads = ringattn.attention_backward(dout, q, k, v, out, lse, causal=causal, window_size=window)
    ref = R.attention_forward(q, k, v, causal, window_size=window)
    gref = R.attention_backward(dout, q, k, v, causal, window_size=window)
    for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (*ref, *gref)):
        close(g, r, TOL[dtype], f"{name} {shape} window={window} causal={causal}", cancelled_scale(q, k, v, dout))


def blocks(rng, family, sq, sk):
    """(q_pos, [(key slice, k_pos)]): 2-3 key blocks, contiguous or striped positions (as the ring)."""
    n = int(rng.integers(2, 4))
    if family == "contiguous":
        cuts = [0, *sorted(rng.choice(np.arange(1, sk), n - 1, replace=False).tolist()), sk]
        return (int(rng.integers(-sq // 2, sk)), 1), [(slice(a, b), (a, 1)) for a, b in zip(cuts, cuts[1:])]
    sizes = [sk // n + (c < sk % n) for c in range(n)]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return (int(rng.integers(n)), n), [(slice(offs[c], offs[c + 1]), (c, n)) for c in range(n)]


@pytest.mark.parametrize("family", ["contiguous", "striped"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS[:-1])
def test_cpu_kernel_blocks_with_positions_match_reference(window, causal, family):
    """The ring's way: several key blocks at global positions merged with accumulate, then backward."""
    rng = np.random.default_rng()
    for shape in SHAPES[:2]:
        b, sq, sk, h, hk, d = shape
        q, k, v, dout = inputs(rng, shape, np.float32)
        q_pos, chunks = blocks(rng, family, sq, sk)
        out, lse = np.zeros(q.shape, np.float32), np.full((b, h, sq), -np.inf, np.float32)
        for s, kp in chunks:
            K.forward(q, k[:, s], v[:, s], out, lse, q_pos=q_pos, k_pos=kp, causal=causal, accumulate=True,
                      window=window)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        dlt = K.delta(dout, out)
        for s, kp in chunks:
            K.backward(dout, q, k[:, s], v[:, s], lse, dlt, dq, dk[:, s], dv[:, s], q_pos=q_pos, k_pos=kp,
                       causal=causal, window=window)
        qp = R.positions(sq, *q_pos)
        kp = np.concatenate([R.positions(s.stop - s.start, *p) for s, p in chunks])
        ref = R.attention_forward(q, k, v, causal, q_pos=qp, k_pos=kp, window_size=window)
        gref = R.attention_backward(dout, q, k, v, causal, q_pos=qp, k_pos=kp, window_size=window)
        for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), (*ref, *gref)):
            close(g, r, 1e-5, f"{name} {shape} {family} q_pos={q_pos} window={window} causal={causal}",
                  cancelled_scale(q, k, v, dout))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(0, 0), (1, -1), (5, 3), (-1, 2), (40, 0)])
def test_cuda_emulated_window_matches_reference(cuda, window, causal):  # noqa: F811
    rng = np.random.default_rng()
    dev = lambda x: FakeDeviceArray(np.ascontiguousarray(x, np.float32))  # noqa: E731
    for shape in [(1, 40, 45, 2, 1, 16), (1, 37, 50, 2, 2, 70)]:  # DMAX 64 and 128 tiles
        b, sq, sk, h, hk, d = shape
        q, k, v, dout = inputs(rng, shape, np.float32)
        q_pos, chunks = blocks(rng, "contiguous", sq, sk)
        out, lse = dev(np.zeros(q.shape)), dev(np.full((b, h, sq), -np.inf))
        for s, kp in chunks:
            cuda.forward(dev(q), dev(k[:, s]), dev(v[:, s]), out, lse, q_pos, kp, causal=causal, accumulate=True,
                         window=window)
        dq, dk, dv = (dev(np.zeros(a.shape)) for a in (q, k, v))
        dlt = cuda.delta(dev(dout), out, into=dev(np.full((b, h, sq), np.nan)))
        for s, kp in chunks:
            cuda.backward(dev(dout), dev(q), dev(k[:, s]), dev(v[:, s]), lse, dlt, dq, dk[:, s], dv[:, s],
                          q_pos=q_pos, k_pos=kp, causal=causal, window=window)
        qp = R.positions(sq, *q_pos)
        kp = np.concatenate([R.positions(s.stop - s.start, *p) for s, p in chunks])
        ref = R.attention_forward(q, k, v, causal, q_pos=qp, k_pos=kp, window_size=window)
        gref = R.attention_backward(dout, q, k, v, causal, q_pos=qp, k_pos=kp, window_size=window)
        got = (out.get(), lse.get(), dq.get(), dk.get(), dv.get())
        for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, (*ref, *gref)):
            close(g, r, 1e-5, f"{name} {shape} q_pos={q_pos} window={window} causal={causal}",
                  cancelled_scale(q, k, v, dout))


def test_window_argument_errors():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(TypeError, match="window_size must be a pair"):
        ringattn.attention_forward(q, q, q, window_size=5)
    with pytest.raises(ValueError, match="window_left must be >= 0, or -1"):
        ringattn.attention_forward(q, q, q, window_size=(-2, 0))
    with pytest.raises(TypeError, match="window_right must be an int"):
        ringattn.attention_forward(q, q, q, window_size=(1, 2.5))
    with pytest.raises(ValueError, match="window bounds must be >= 0, or -1"):  # the bindings check it too
        K.forward(q, q, q, np.empty_like(q), np.empty((1, 2, 4), np.float32), window=(0, -3))


def test_mask_value():
    assert Mask(causal=True, window_left=4, window_right=9).right == 0  # causal wins (flash-attn)
    assert Mask.of(True, None) == Mask(True) and Mask.of(False, (-1, -1)).unmasked
    m = Mask(False, 2, 1)
    qp, kp = np.arange(10)[:, None], np.arange(10)[None, :]
    np.testing.assert_array_equal(m.visible(qp, kp), (kp >= qp - 2) & (kp <= qp + 1))


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_ring_steps(P):
    S = 64 * P
    # contiguous: a causal window shorter than a shard needs the previous rank's block only
    assert ring_steps(Mask(True, 10), S, P, "contiguous") == 2
    assert ring_steps(Mask(True, 64), S, P, "contiguous") == 2
    assert ring_steps(Mask(True, 65), S, P, "contiguous") == min(3, P)
    assert ring_steps(Mask(True), S, P, "contiguous") == P
    assert ring_steps(Mask(True, 0), S, P, "contiguous") == 1  # every query sees only itself
    # a two-sided window needs the next rank's block, which comes last round a one-way ring
    assert ring_steps(Mask(False, 10, 10), S, P, "contiguous") == P
    # zigzag and striped spread neighbours over all ranks
    assert ring_steps(Mask(True, 10), S, P, "striped") == P
    assert ring_steps(Mask(True, 10), S, P, "zigzag") == P


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_window_matches_reference(P):
    r = run_file(P, "ring_window.py", timeout=600)
    assert r.stdout.strip().endswith("ok"), r.stdout[-3000:]
