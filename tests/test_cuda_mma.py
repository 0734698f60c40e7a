"""The tensor-core forward (cuda/attention_mma.cu) under the warp emulation: 16-bit inputs with head
dim 64 or 128 take it (checked through the emulated build's launch counts); it is held to the rule
of the 16-bit SIMT kernels: within 2x the error of a same-precision naive computation against the
float64 reference, with outputs poisoned (NaN) before the call, awkward lengths, GQA, causal with
(start, stride) positions and the ring's accumulate over several key blocks.

Emulated only: this checks the fragment bookkeeping, masking, softmax and merge logic, and the
cp.async / barrier discipline (a missing wait reads poison); not speed (benchmarks/gpu/run.sh).
"""
import numpy as np
import pytest

from nonfinite_ref import missed, row_reference, visibility
from ringattn import reference
from ringattn.device import bfloat16
from fake_device import FakeDeviceArray
from test_cuda_emulated import cuda, monkeypatch_module, naive_same_precision, qkv, rng, rounded, to_dev  # noqa: F401

MMA = "attn_fwd_mma_kernel"


def launches():
    from ringattn.backends import cuda as backend

    return dict(backend._state.module.emulated_launches())


def mma_launches():
    return launches().get(MMA, 0)


def poisoned(shape, dtype):
    if dtype == "bfloat16":
        return FakeDeviceArray(np.full(shape, 0x7FC0, np.uint16), dtype=bfloat16)
    return FakeDeviceArray(np.full(shape, np.nan, dtype))


@pytest.mark.parametrize("dtype,b,sq,sk,h,hkv,d,causal", [
    ("bfloat16", 1, 130, 130, 2, 1, 64, True),    # GQA, a partial last tile of queries and keys
    ("float16", 1, 97, 130, 4, 2, 128, False),    # seq_q != seq_k, D 128
    ("bfloat16", 2, 1, 97, 2, 2, 128, True),      # one query (sees every key), batch 2
    ("float16", 1, 130, 97, 2, 1, 64, True),      # seq_q > seq_k: leading rows see no key
])
def test_forward_within_2x_of_naive(cuda, dtype, b, sq, sk, h, hkv, d, causal):
    q, k, v = (rounded(x, dtype) for x in qkv(b, sq, sk, h, hkv, d))
    before = mma_launches()
    out, lse = cuda.attention_forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), causal=causal)
    assert mma_launches() == before + 1
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    got = out.get().astype(np.float64)
    fin = np.isfinite(ref_lse)
    rows = np.moveaxis(fin, 1, 2)  # (b, sq, h): rows with a visible key (the naive one is NaN elsewhere)
    err = reference.rel_error(got[rows], ref_out[rows])
    with np.errstate(invalid="ignore"):
        naive = naive_same_precision(q, k, v, causal, dtype)
    err_naive = reference.rel_error(naive[rows], ref_out[rows])
    assert err <= 2 * err_naive, (err, err_naive)
    assert np.array_equal(np.isfinite(lse.get()), fin)
    assert reference.rel_error(lse.get()[fin], ref_lse[fin]) < 1e-5  # float32 scores of exact 16-bit inputs
    if not fin.all():  # rows with no visible key: out 0, lse -inf
        assert np.all(got[np.moveaxis(~fin, 1, 2)] == 0)


def test_other_calls_stay_on_the_simt_kernel(cuda):
    """float32, or a head dim other than 64 / 128, or rows not 16-byte aligned: the general path."""
    q, k, v = qkv(1, 20, 20, 2, 2, 64)
    before = mma_launches()
    cuda.attention_forward(to_dev(q, "float32"), to_dev(k, "float32"), to_dev(v, "float32"))
    q2, k2, v2 = qkv(1, 20, 20, 2, 2, 59)
    cuda.attention_forward(to_dev(q2, "float16"), to_dev(k2, "float16"), to_dev(v2, "float16"))
    assert mma_launches() == before


def test_striped_positions_and_accumulate_over_key_blocks(cuda):
    """Queries at (1, 2) against keys at (0, 2) is plain causal attention (key j visible iff j <= i),
    computed the ring's way: three key blocks folded into a float32 running (out, lse) that starts
    poisoned, the first call overwriting it; then a block entirely in the future leaves it as it is."""
    dtype, b, s, h, hkv, d = "bfloat16", 1, 97, 2, 1, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    out = poisoned((b, s, h, d), np.float32)
    lse = poisoned((b, h, s), np.float32)
    cuts = [0, 30, 70, s]
    before = mma_launches()
    for n, (j0, j1) in enumerate(zip(cuts, cuts[1:])):
        cuda.forward(to_dev(q, dtype), to_dev(k[:, j0:j1], dtype), to_dev(v[:, j0:j1], dtype), out, lse,
                     q_pos=(1, 2), k_pos=(2 * j0, 2), causal=True, accumulate=n > 0)
    assert mma_launches() == before + 3
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=True)
    err = reference.rel_error(out.get(), ref_out)
    err_naive = reference.rel_error(naive_same_precision(q, k, v, True, dtype), ref_out)
    assert err <= 2 * err_naive, (err, err_naive)
    assert reference.rel_error(lse.get(), ref_lse) < 1e-5
    kept = out.get(), lse.get()
    cuda.forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), out, lse, q_pos=(1, 2), k_pos=(10**6, 1),
                 causal=True, accumulate=True)
    assert np.array_equal(out.get(), kept[0]) and np.array_equal(lse.get(), kept[1])


def test_accumulate_matches_simt_kernel(cuda):
    """The same contiguous-position ring merge through the mma kernel (16-bit) and the SIMT kernel
    (the same data in float32): the float32 results agree to the 16-bit rounding of P."""
    b, s, h, d = 1, 70, 2, 128
    q, k, v = (rounded(x, "float16") for x in qkv(b, s, 2 * s, h, h, d))
    res = {}
    for dtype in ("float16", "float32"):
        out = poisoned((b, s, h, d), np.float32)
        lse = poisoned((b, h, s), np.float32)
        for n, j0 in enumerate((0, s)):
            cuda.forward(to_dev(q, dtype), to_dev(k[:, j0:j0 + s], dtype), to_dev(v[:, j0:j0 + s], dtype), out, lse,
                         q_pos=(s, 1), k_pos=(j0, 1), causal=True, accumulate=n > 0)
        res[dtype] = out.get(), lse.get()
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=True)
    assert reference.rel_error(res["float32"][0], ref_out) < 1e-5
    assert reference.rel_error(res["float16"][0], ref_out) < 2e-3
    assert reference.rel_error(res["float16"][1], ref_lse) < 1e-5


def test_nan_reaches_the_rows_that_see_it(cuda):
    """A NaN key is seen by the queries at and after its position (causal): their out and lse are
    NaN; the rows before it stay finite; a NaN query row is NaN only in its own row."""
    dtype, b, s, h, d = "float16", 1, 97, 2, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, h, d))
    k[0, 50, 1, 3] = np.nan
    q[0, 20, 0, 7] = np.nan
    out, lse = cuda.attention_forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), causal=True)
    o, l = out.get().astype(np.float64), lse.get()
    assert np.isnan(l[0, 1, 50:]).all() and np.isfinite(l[0, 1, :50]).all()
    assert np.isnan(o[0, 50:, 1]).all() and np.isfinite(o[0, :50, 1]).all()
    assert np.isnan(l[0, 0, 20]) and np.isnan(o[0, 20, 0]).all()
    assert np.isfinite(np.delete(l[0, 0], 20)).all() and np.isfinite(np.delete(o[0, :, 0], 20, axis=0)).all()


# ---- the tensor-core backward (attn_bwd_mma_kernel) ------------------------------------------------
BWD = "attn_bwd_mma_kernel"


def bwd_launches():
    return launches().get(BWD, 0)


def backward_16bit(cuda, dtype, q, k, v, dout, causal):
    """attention_backward on 16-bit device arrays (the forward's out and lse as the ring has them);
    float32 gradients (the kernels' float32 accumulators, before the public API's cast)."""
    dev = lambda x: to_dev(x, dtype)  # noqa: E731
    out, lse = cuda.attention_forward(dev(q), dev(k), dev(v), causal=causal)
    sq = q.shape[1]
    dlt = cuda.delta(dev(dout), out)
    grads = [FakeDeviceArray(np.zeros(a.shape, np.float32)) for a in (q, k, v)]
    cuda.backward(dev(dout), dev(q), dev(k), dev(v), lse, dlt, *grads, q_pos=(k.shape[1] - sq, 1), causal=causal)
    return [g.get().astype(np.float64) for g in grads]


@pytest.mark.parametrize("dtype,b,sq,sk,h,hkv,d,causal", [
    ("bfloat16", 1, 130, 97, 4, 2, 64, True),     # GQA, partial query and key tiles, leading rows see nothing
    ("float16", 1, 97, 130, 2, 1, 128, False),    # MQA, D 128, seq_q < seq_k
    ("bfloat16", 2, 1, 70, 2, 2, 128, True),      # one query, batch 2
    ("float16", 1, 70, 70, 2, 2, 64, True),
])
def test_backward_within_2x_of_naive(cuda, dtype, b, sq, sk, h, hkv, d, causal):
    q, k, v = (rounded(x, dtype) for x in qkv(b, sq, sk, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    before = bwd_launches()
    grads = backward_16bit(cuda, dtype, q, k, v, dout, causal)
    assert bwd_launches() == before + 1
    refs = reference.attention_backward(dout, q, k, v, causal=causal)
    with np.errstate(invalid="ignore"):
        naive = naive_same_precision(q, k, v, causal, dtype, dout)[1:]
    for name, got, ref, nv in zip("qkv", grads, refs, naive):
        nv = np.nan_to_num(nv)  # the naive softmax is 0/0 on rows that see no key; their gradient is 0
        err, err_naive = reference.rel_error(got, ref), reference.rel_error(nv, ref)
        assert err <= 2 * err_naive, (name, err, err_naive)


def test_backward_public_api_and_poisoned_outputs(cuda):
    """ringattn.cuda.attention_backward (16-bit in, 16-bit out) through the tensor-core kernel, and
    backward() adding into given float32 gradients: poisoned rows of dq stay NaN (it adds, and
    every row is touched), zero-started ones hold exactly the gradient."""
    dtype, b, s, h, d = "bfloat16", 1, 97, 2, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, h, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    dev = lambda x: to_dev(x, dtype)  # noqa: E731
    out, lse = cuda.attention_forward(dev(q), dev(k), dev(v), causal=True)
    before = bwd_launches()
    dq, dk, dv = cuda.attention_backward(dev(dout), dev(q), dev(k), dev(v), out, lse, causal=True)
    assert bwd_launches() == before + 1 and dq.dtype is bfloat16
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    naive = naive_same_precision(q, k, v, True, dtype, dout)[1:]
    for got, ref, nv in zip((dq, dk, dv), refs, naive):
        assert reference.rel_error(got.get(), ref) <= 2 * reference.rel_error(nv, ref)
    dq32 = np.zeros(q.shape, np.float32)
    dq32[0, 10] = np.nan
    dqd = FakeDeviceArray(dq32)
    dk0 = rng.standard_normal(k.shape).astype(np.float32)  # backward adds to what is there
    dkd, dvd = FakeDeviceArray(dk0.copy()), FakeDeviceArray(np.zeros(v.shape, np.float32))
    cuda.backward(dev(dout), dev(q), dev(k), dev(v), lse, cuda.delta(dev(dout), out), dqd, dkd, dvd, causal=True)
    got = dqd.get()
    assert np.isnan(got[0, 10]).all() and np.isfinite(np.delete(got[0], 10, axis=0)).all()
    assert reference.rel_error(dkd.get() - dk0, refs[1]) <= 2 * reference.rel_error(naive[1], refs[1])


def test_backward_positions_over_key_blocks_match_simt(cuda):
    """Striped positions, the ring's way: queries at (1, 2) against three key blocks at (2 j0, 2),
    gradients added into the same float32 dq and into slices of dk, dv. The tensor-core kernel
    (float16) against the SIMT kernel on the same (exact float16) data in float32, and the float64
    reference; a key block entirely in the future adds nothing."""
    b, s, h, hkv, d = 1, 97, 4, 2, 128
    q, k, v = (rounded(x, "float16") for x in qkv(b, s, s, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), "float16")
    ro, rl = reference.attention_forward(q, k, v, causal=True)
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    cuts = [0, 30, 70, s]
    res = {}
    for dtype in ("float16", "float32"):
        dev = lambda x: to_dev(x, dtype)  # noqa: E731, B023
        f32 = lambda x: FakeDeviceArray(np.ascontiguousarray(x, np.float32))  # noqa: E731
        lse, dlt = f32(rl), f32(np.einsum("bihd,bihd->bhi", dout, ro))
        dq, dk, dv = (FakeDeviceArray(np.zeros(a.shape, np.float32)) for a in (q, k, v))
        before = bwd_launches()
        for j0, j1 in zip(cuts, cuts[1:]):
            cuda.backward(dev(dout), dev(q), dev(k[:, j0:j1]), dev(v[:, j0:j1]), lse, dlt, dq, dk[:, j0:j1],
                          dv[:, j0:j1], q_pos=(1, 2), k_pos=(2 * j0, 2), causal=True)
        kept = [a.get() for a in (dq, dk, dv)]
        cuda.backward(dev(dout), dev(q), dev(k), dev(v), lse, dlt, dq, dk, dv, q_pos=(1, 2), k_pos=(10**6, 1),
                      causal=True)
        assert all(np.array_equal(a.get(), x) for a, x in zip((dq, dk, dv), kept))
        assert bwd_launches() == before + (4 if dtype == "float16" else 0)
        res[dtype] = kept
    for got16, got32, ref in zip(res["float16"], res["float32"], refs):
        assert reference.rel_error(got32, ref) < 1e-5
        assert reference.rel_error(got16, ref) < 4e-3  # P and dS rounded to float16 before their products
        assert reference.rel_error(got16, got32) < 4e-3


def test_backward_nan_reaches_every_gradient_that_depends_on_it(cuda):
    """A NaN in k (head 1, causal) and one in dout (head 0, row 20): every gradient element the
    row-by-row float64 reference makes NaN is NaN (nothing vanishes). Where no hidden pair can carry
    the NaN, the set is exact: dq of head 0 only in row 20, dk of head 0 only for the keys row 20
    sees (masked pairs are selected to 0, and q is finite). dv and head 1 may spread further through
    hidden pairs of a tile (0 * NaN), as the SIMT kernel's do (docs/numerics.md)."""
    b, s, h, d = 1, 97, 2, 64
    q, k, v = (rounded(x, "bfloat16") for x in qkv(b, s, s, h, h, d))
    dout = rounded(rng.standard_normal(q.shape), "bfloat16")
    k[0, 50, 1, 3] = np.nan
    dout[0, 20, 0, 7] = np.nan
    before = bwd_launches()
    with np.errstate(invalid="ignore"):
        grads = backward_16bit(cuda, "bfloat16", q, k, v, dout, True)
    assert bwd_launches() == before + 1
    pos = np.arange(s)
    _, _, *want = row_reference(q, k, v, visibility(pos, pos, True), 1 / np.sqrt(d), dout)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert not missed(got, ref).any(), f"{name}: a NaN vanished"
    dq, dk, _ = grads
    assert np.array_equal(np.isnan(dq[0, :, 0]).any(-1), pos == 20) and np.isnan(dq[0, 20, 0]).all()
    assert np.array_equal(np.isnan(dk[0, :, 0]).any(-1), pos <= 20) and np.isnan(dk[0, :21, 0]).all()


def test_backward_other_calls_stay_on_the_simt_kernel(cuda):
    q, k, v = qkv(1, 20, 20, 2, 2, 64)
    before = bwd_launches()
    backward_16bit(cuda, "float32", q, k, v, q, False)
    q2, k2, v2 = qkv(1, 20, 20, 2, 2, 48)
    backward_16bit(cuda, "float16", q2, k2, v2, q2, False)
    assert bwd_launches() == before


# ---- sliding windows (cpp/mask.hpp) in the tensor-core kernels ----------------------------------------
def within_2x_of_naive(got, ref, naive, rows=None):
    """err(got) <= 2 err(naive) against the float64 reference, on the rows given (all by default)."""
    if rows is not None:
        got, ref, naive = got[rows], ref[rows], naive[rows]
    err, err_naive = reference.rel_error(got, ref), reference.rel_error(np.nan_to_num(naive), ref)
    assert err <= 2 * err_naive, (err, err_naive)


@pytest.mark.parametrize("dtype,sq,sk,h,hkv,d,causal,window", [
    ("bfloat16", 130, 130, 2, 1, 64, True, (0, -1)),     # window 0: each query sees its own position only
    ("float16", 97, 130, 4, 2, 128, False, (1, 1)),      # window 1 on both sides, GQA, D 128
    ("bfloat16", 200, 200, 2, 2, 64, True, (20, -1)),    # shorter than a tile: leading key tiles skipped
    ("float16", 130, 97, 2, 1, 64, True, (5, -1)),       # seq_q > seq_k: leading rows see no key
    ("bfloat16", 70, 90, 2, 1, 128, False, (500, 500)),  # longer than the sequence: every key
    ("float16", 150, 150, 4, 1, 64, False, (-1, 10)),    # right bound only (left unbounded), MQA
    ("bfloat16", 160, 200, 2, 2, 128, False, (70, 3)),   # longer than a tile, asymmetric
])
def test_window_forward_and_backward_within_2x_of_naive(cuda, dtype, sq, sk, h, hkv, d, causal, window):
    """Windowed calls take the tensor-core kernels (launch counts) and meet the 16-bit rule, forward
    (poisoned out / lse) and backward (float32 gradients from zero), positions bottom-right aligned."""
    b = 1
    q, k, v = (rounded(x, dtype) for x in qkv(b, sq, sk, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    dev = lambda x: to_dev(x, dtype)  # noqa: E731
    pos = dict(q_pos=(sk - sq, 1), k_pos=(0, 1), causal=causal, window=window)
    out, lse = poisoned((b, sq, h, d), dtype), poisoned((b, h, sq), np.float32)
    before = launches()
    cuda.forward(dev(q), dev(k), dev(v), out, lse, **pos)
    dlt = cuda.delta(dev(dout), out)
    grads = [FakeDeviceArray(np.zeros(a.shape, np.float32)) for a in (q, k, v)]
    cuda.backward(dev(dout), dev(q), dev(k), dev(v), lse, dlt, *grads, **pos)
    after = launches()
    assert (after.get(MMA, 0) - before.get(MMA, 0), after.get(BWD, 0) - before.get(BWD, 0)) == (1, 1)

    vis = reference._visible(sq, sk, causal, None, None, window)
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal, window_size=window)
    refs = reference.attention_backward(dout, q, k, v, causal, window_size=window)
    with np.errstate(invalid="ignore"):
        naive = naive_same_precision(q, k, v, causal, dtype, dout, vis=vis)
    got_out = out.get().astype(np.float64)
    sees = vis.any(-1)  # rows that see a key; the others: out 0, lse -inf
    within_2x_of_naive(got_out[:, sees], ref_out[:, sees], naive[0][:, sees])
    assert np.all(got_out[:, ~sees] == 0) and np.all(lse.get()[:, :, ~sees] == -np.inf)
    assert reference.rel_error(lse.get()[:, :, sees], ref_lse[:, :, sees]) < 1e-5
    for got, ref, nv in zip(grads, refs, naive[1:]):
        within_2x_of_naive(got.get().astype(np.float64), ref, nv)


def test_window_over_key_blocks_accumulates(cuda):
    """The ring's way with a causal window (left 30) on striped positions: three key blocks folded
    into a poisoned float32 running (out, lse), then the backward over the same blocks adding into
    one dq and slices of dk, dv; a block entirely left of every window changes nothing."""
    dtype, b, s, h, hkv, d, window = "bfloat16", 1, 150, 4, 2, 64, (30, -1)
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    dev = lambda x: to_dev(x, dtype)  # noqa: E731
    out, lse = poisoned((b, s, h, d), np.float32), poisoned((b, h, s), np.float32)
    cuts = [0, 45, 110, s]
    blocks = [(slice(j0, j1), (2 * j0, 2)) for j0, j1 in zip(cuts, cuts[1:])]
    before = launches()
    for n, (sl, kp) in enumerate(blocks):
        cuda.forward(dev(q), dev(k[:, sl]), dev(v[:, sl]), out, lse, q_pos=(1, 2), k_pos=kp, causal=True,
                     accumulate=n > 0, window=window)
    dlt = cuda.delta(dev(dout), out)
    dq, dk, dv = (FakeDeviceArray(np.zeros(a.shape, np.float32)) for a in (q, k, v))
    for sl, kp in blocks:
        cuda.backward(dev(dout), dev(q), dev(k[:, sl]), dev(v[:, sl]), lse, dlt, dq, dk[:, sl], dv[:, sl],
                      q_pos=(1, 2), k_pos=kp, causal=True, window=window)
    after = launches()
    assert (after.get(MMA, 0) - before.get(MMA, 0), after.get(BWD, 0) - before.get(BWD, 0)) == (3, 3)

    qp, kp = reference.positions(s, 1, 2), reference.positions(s, 0, 2)
    vis = reference._visible(s, s, True, qp, kp, window)
    ref_out, ref_lse = reference.attention_forward(q, k, v, True, q_pos=qp, k_pos=kp, window_size=window)
    refs = reference.attention_backward(dout, q, k, v, True, q_pos=qp, k_pos=kp, window_size=window)
    naive = naive_same_precision(q, k, v, True, dtype, dout, vis=vis)
    within_2x_of_naive(out.get().astype(np.float64), ref_out, naive[0])
    assert reference.rel_error(lse.get(), ref_lse) < 1e-5
    for got, ref, nv in zip((dq, dk, dv), refs, naive[1:]):
        within_2x_of_naive(got.get().astype(np.float64), ref, nv)

    kept = [a.get() for a in (out, lse, dq, dk, dv)]
    far = dict(q_pos=(1, 2), k_pos=(-10**6, 1), causal=True, window=window)  # left of every window
    cuda.forward(dev(q), dev(k), dev(v), out, lse, accumulate=True, **far)
    cuda.backward(dev(dout), dev(q), dev(k), dev(v), lse, dlt, dq, dk, dv, **far)
    assert all(np.array_equal(a.get(), x) for a, x in zip((out, lse, dq, dk, dv), kept))
