"""A NaN or Inf in q, k or v never vanishes in the kernels: every output element that depends on it
is non-finite, never a finite number computed as if the bad value were not there.

CPU kernels (cpp/attention.cpp, float32 and float64) and the CUDA kernels (cuda/attention.cu, in
the host emulation of tests/test_cuda_emulated.py, float32), each on:
  - one non-accumulating call, and the ring's way: two or three key blocks merged with
    accumulate=True in random order (a block with a bad key first, then one without, is the case
    that lost the NaN);
  - contiguous and striped positions, causal and not;
  - forward (out, lse) and backward (dq, dk, dv from the kernel's own out and lse).
Fresh random inputs and 1-3 bad values (NaN, +Inf, -Inf) at random places. The expected
non-finite elements come from the float64 reference row by row (tests/nonfinite_ref.py).

Rows that cannot see a bad value (hidden by causality): forward out and lse stay finite for a bad q
or k; a bad v and the backward may also reach rows and keys of the same tile (docs/numerics.md).
"""
import numpy as np
import pytest

from nonfinite_ref import check, poison, row_reference, visibility
from ringattn import kernels as K
from ringattn import reference as R
from fake_device import FakeDeviceArray
from test_cuda_emulated import cuda, monkeypatch_module  # noqa: F401  (fixtures: the emulated CUDA module)

TOL = {np.float32: 1e-5, np.float64: 1e-12}
TRIALS = 2  # fresh inputs and bad-value placements per case

# (batch, seq_q, seq_k, heads, heads_kv, dim): GQA, several query and key tiles, odd sizes, one query.
CPU_SHAPES = [(2, 97, 130, 4, 2, 59), (1, 150, 45, 2, 1, 16), (1, 1, 70, 3, 1, 5)]
CUDA_SHAPES = [(1, 40, 45, 2, 1, 16), (1, 37, 50, 2, 2, 70)]  # DMAX 64 and 128 tiles


def key_chunks(rng, family, sq, sk, nchunks):
    """Query positions (start, stride) and key blocks [(slice, (start, stride))] covering the keys.

    contiguous: blocks of consecutive positions, queries from a random start (some rows may see
    nothing); striped: block c holds positions c, c + P, ... (P = max(nchunks, 2)), queries r + P i."""
    cuts = np.sort(rng.choice(np.arange(1, sk), size=nchunks - 1, replace=False)) if nchunks > 1 else []
    bounds = [0, *map(int, cuts), sk]
    if family == "contiguous":
        q_pos = (int(rng.choice([sk - sq, rng.integers(-sq // 2, sk)])), 1)
        return q_pos, [(slice(a, b), (a, 1)) for a, b in zip(bounds, bounds[1:])]
    P = max(nchunks, 2)
    sizes = [sk // nchunks + (c < sk % nchunks) for c in range(nchunks)]
    offs = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    return (int(rng.integers(P)), P), [(slice(offs[c], offs[c + 1]), (c, P)) for c in range(nchunks)]


def all_key_positions(chunks):
    return np.concatenate([R.positions(s.stop - s.start, *kp) for s, kp in chunks])


def case(rng, shape, dtype, family, causal, accumulate):
    """Random inputs with bad values, positions, and the row-by-row reference."""
    b, sq, sk, h, hk, d = shape
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d),
                                                                    (b, sq, h, d)))
    placed = poison(rng, [q, k, v])
    q_pos, chunks = key_chunks(rng, family, sq, sk, int(rng.integers(2, 4)) if accumulate else 1)
    order = rng.permutation(len(chunks))
    vis = visibility(R.positions(sq, *q_pos), all_key_positions(chunks), causal)
    ref = row_reference(q, k, v, vis, 1.0 / np.sqrt(d), dout)
    info = dict(placed=placed, q_pos=q_pos, chunks=[(s.start, s.stop, kp) for s, kp in chunks], order=order.tolist())
    return (q, k, v, dout), q_pos, [chunks[i] for i in order], ref, info


def check_all(got, ref, tol, placed, info):
    """out: exactly the reference's non-finite set unless v holds a bad value; lse: exactly;
    gradients: at least the reference's non-finite set. Finite elements match the reference."""
    names = ("out", "lse", "dq", "dk", "dv")
    v_bad = any(name == "v" for name, _, _ in placed)
    for name, g, r in zip(names, got, ref):
        check(g, r, tol, f"{name} {info}", exact_set=(name == "lse" or (name == "out" and not v_bad)))


# ---- CPU -------------------------------------------------------------------------------------------
def cpu_run(arrays, q_pos, chunks, causal, accumulate, first_writes):
    q, k, v, dout = arrays
    b, sq, h, _ = q.shape
    lse_dt = K.lse_dtype(q.dtype)
    if accumulate and not first_writes:  # the ring's start state
        out, lse = np.zeros(q.shape, q.dtype), np.full((b, h, sq), -np.inf, lse_dt)
    else:
        out, lse = np.full(q.shape, np.nan, q.dtype), np.full((b, h, sq), np.nan, lse_dt)
    for n, (s, kp) in enumerate(chunks):
        K.forward(q, k[:, s], v[:, s], out, lse, q_pos=q_pos, k_pos=kp, causal=causal,
                  accumulate=accumulate and not (first_writes and n == 0))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dlt = K.delta(dout, out)
    for s, kp in chunks:
        K.backward(dout, q, k[:, s], v[:, s], lse, dlt, dq, dk[:, s], dv[:, s], q_pos=q_pos, k_pos=kp, causal=causal)
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", ["contiguous", "striped"])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_cpu_bad_values_reach_every_row_that_sees_them(shape, family, causal, accumulate, dtype):
    rng = np.random.default_rng()
    with np.errstate(all="ignore"):
        for _ in range(TRIALS):
            arrays, q_pos, chunks, ref, info = case(rng, shape, dtype, family, causal, accumulate)
            first_writes = bool(rng.integers(2))
            got = cpu_run(arrays, q_pos, chunks, causal, accumulate, first_writes)
            check_all(got, ref, TOL[dtype], info["placed"], dict(info, first_writes=first_writes))


# ---- CUDA kernels (host emulation) -----------------------------------------------------------------
def cuda_run(cu, arrays, q_pos, chunks, causal, accumulate):
    dev = lambda x: FakeDeviceArray(np.ascontiguousarray(x, np.float32))  # noqa: E731
    q, k, v, dout = arrays
    b, sq, h, _ = q.shape
    if accumulate:  # the ring's start state
        out, lse = dev(np.zeros(q.shape)), dev(np.full((b, h, sq), -np.inf))
    else:
        out, lse = dev(np.full(q.shape, np.nan)), dev(np.full((b, h, sq), np.nan))
    for s, kp in chunks:
        cu.forward(dev(q), dev(k[:, s]), dev(v[:, s]), out, lse, q_pos, kp, causal=causal, accumulate=accumulate)
    dq, dk, dv = (dev(np.zeros(a.shape)) for a in (q, k, v))
    dlt = cu.delta(dev(dout), out, into=dev(np.full((b, h, sq), np.nan)))
    for s, kp in chunks:
        cu.backward(dev(dout), dev(q), dev(k[:, s]), dev(v[:, s]), lse, dlt, dq, dk[:, s], dv[:, s], q_pos=q_pos,
                    k_pos=kp, causal=causal)
    return tuple(a.get() for a in (out, lse, dq, dk, dv))


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", ["contiguous", "striped"])
@pytest.mark.parametrize("shape", CUDA_SHAPES)
def test_cuda_emulated_bad_values_reach_every_row_that_sees_them(cuda, shape, family, causal, accumulate):  # noqa: F811
    rng = np.random.default_rng()
    with np.errstate(all="ignore"):
        for _ in range(TRIALS):
            arrays, q_pos, chunks, ref, info = case(rng, shape, np.float32, family, causal, accumulate)
            got = cuda_run(cuda, arrays, q_pos, chunks, causal, accumulate)
            check_all(got, ref, 1e-5, info["placed"], info)


def test_row_reference_says_which_rows_see_a_bad_value():
    """The expectation itself: with causality a NaN in v reaches exactly the rows at or after its
    position (out only), a NaN in k the same rows' out and lse; gradients follow those rows."""
    rng = np.random.default_rng()
    pos = R.positions(20)
    for name in ("v", "k"):
        q, k, v, dout = (rng.standard_normal((1, 20, 2, 8)) for _ in range(4))
        (v if name == "v" else k)[0, 7, 1, 3] = np.nan
        out, lse, dq, dk, dv = row_reference(q, k, v, visibility(pos, pos, True), 1 / np.sqrt(8), dout)
        sees = pos >= 7
        np.testing.assert_array_equal(~np.isfinite(out[0, :, 1]).all(-1), sees)
        np.testing.assert_array_equal(~np.isfinite(lse[0, 1]), sees if name == "k" else np.zeros(20, bool))
        assert np.isfinite(out[0, :, 0]).all() and np.isfinite(lse[0, 0]).all()  # the other kv head
        np.testing.assert_array_equal(~np.isfinite(dq[0, :, 1]).all(-1), sees)
        np.testing.assert_array_equal(~np.isfinite(dk[0, :, 1]).all(-1), pos <= 19)  # keys seen by those rows
        assert np.isfinite(dq[0, :7]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_float64_reference_keeps_bad_values(causal):
    """ringattn.reference (the ground truth of every other test) must not drop a NaN/Inf either:
    lse is non-finite exactly where the row-by-row reference says; in out and the gradients every
    element the row-by-row reference makes non-finite is non-finite (the full-matrix form may spread
    0 * NaN further, through hidden pairs, as a kernel tile does)."""
    rng = np.random.default_rng()
    b, sq, sk, h, hk, d = 1, 23, 31, 4, 2, 6
    q, k, v = rng.standard_normal((b, sq, h, d)), rng.standard_normal((b, sk, hk, d)), rng.standard_normal((b, sk, hk, d))
    poison(rng, [q, k, v])
    dout = rng.standard_normal(q.shape)
    vis = visibility(R.positions(sq, sk - sq), R.positions(sk), causal)
    want = dict(zip(("out", "lse", "dq", "dk", "dv"), row_reference(q, k, v, vis, 1.0 / np.sqrt(d), dout=dout)))
    got = dict(zip(("out", "lse"), R.attention_forward(q, k, v, causal=causal)))
    got.update(zip(("dq", "dk", "dv"), R.attention_backward(dout, q, k, v, causal=causal)))
    assert np.array_equal(np.isfinite(got["lse"]), np.isfinite(want["lse"]))
    for name in ("out", "dq", "dk", "dv"):
        assert not (np.isfinite(got[name]) & ~np.isfinite(want[name])).any(), f"{name}: a bad value vanished"


# ---- rows whose visible scores are all -inf (IEEE: out 0/0 = NaN, lse log 0 = -inf) ---------------
# q has a positive component 0 and block A (keys 0..3) has -inf there, so every score against block A
# is -inf; block B (keys 4..9) is finite. Queries sit at positions 2..7, block A at 5..8, block B at
# 0..5: with causal, query rows 0..2 see no key of A, rows 3..5 some, and key 3 (position 8) no row.
Q_POS, A_POS, B_POS = (2, 1), (5, 1), (0, 1)
A, B = slice(0, 4), slice(4, 10)


def minus_inf_case(rng, dtype):
    b, sq, sk, h, hk, d = 1, 6, 10, 2, 1, 5
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d),
                                                                    (b, sq, h, d)))
    q[..., 0] = np.abs(q[..., 0]) + 0.5
    k[:, A, :, 0] = -np.inf
    return q, k, v, dout


def minus_inf_reference(q, k, v, causal):
    kp = np.concatenate([R.positions(4, *A_POS), R.positions(6, *B_POS)])
    return R.attention_forward(q, k, v, causal=causal, q_pos=R.positions(6, *Q_POS), k_pos=kp)


def minus_inf_expectations(got_a, merged, grads_a, ref, causal):
    """got_a: (out, lse) of block A alone; merged: A and B merged (either order); grads_a: (dq, dk, dv)
    of block A alone from got_a's (out, lse)."""
    out_a, lse_a = got_a
    sees = np.arange(6) >= 3 if causal else np.ones(6, bool)  # query rows that see a key of block A
    assert np.isnan(out_a[:, sees]).all() and (out_a[:, ~sees] == 0).all(), "out: NaN exactly where keys are seen"
    assert (lse_a == -np.inf).all()
    tol = 1e-5 if merged[0].dtype == np.float32 else 1e-12
    assert np.isfinite(merged[0]).all() and R.rel_error(merged[0], ref[0]) < tol  # the -inf keys weigh 0
    assert R.rel_error(merged[1], ref[1]) < tol
    dq, dk, dv = grads_a
    assert np.isnan(dq[:, sees]).all(), "dq of rows with lse -inf that see keys: p = exp(-inf - -inf) = NaN"
    seen = np.array([True, True, True, not causal])  # keys of block A some row sees
    for name, g in (("dk", dk), ("dv", dv)):
        assert np.isnan(g[:, seen]).any(axis=(0, 2, 3)).all(), f"{name}: every seen key is non-finite"
        assert (g[:, ~seen] == 0).all(), f"{name}: a key no row sees stays exactly 0 (a select, not a product)"


def test_reference_minus_inf_row_is_nan_then_merged_away():
    rng = np.random.default_rng()
    q, k, v, dout = minus_inf_case(rng, np.float64)
    qp = R.positions(6, *Q_POS)
    with np.errstate(all="ignore"):
        for causal in (False, True):
            oa, la = R.attention_forward(q, k[:, A], v[:, A], causal, q_pos=qp, k_pos=R.positions(4, *A_POS))
            ob, lb = R.attention_forward(q, k[:, B], v[:, B], causal, q_pos=qp, k_pos=R.positions(6, *B_POS))
            grads = R.attention_backward(dout, q, k[:, A], v[:, A], causal, q_pos=qp, k_pos=R.positions(4, *A_POS))
            ref = minus_inf_reference(q, k, v, causal)
            for merged in (R.merge(oa, la, ob, lb), R.merge(ob, lb, oa, la)):
                minus_inf_expectations((oa, la), merged, grads, ref, causal)
            # neither side has weight: a NaN side stays NaN, two "no key" sides stay 0
            empty = np.zeros_like(oa), np.full_like(la, -np.inf)
            assert np.isnan(R.merge(oa, la, *empty)[0][:, 3:]).all()
            assert (R.merge(*empty, *empty)[0] == 0).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_minus_inf_row_is_nan_then_merged_away(dtype, causal):
    rng = np.random.default_rng()
    q, k, v, dout = minus_inf_case(rng, dtype)
    lse_dt = K.lse_dtype(dtype)
    with np.errstate(all="ignore"):
        out_a, lse_a = np.full(q.shape, np.nan, dtype), np.full((1, 2, 6), np.nan, lse_dt)
        K.forward(q, k[:, A], v[:, A], out_a, lse_a, q_pos=Q_POS, k_pos=A_POS, causal=causal)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k[:, A]), np.zeros_like(v[:, A])
        K.backward(dout, q, k[:, A], v[:, A], lse_a, K.delta(dout, out_a), dq, dk, dv, q_pos=Q_POS, k_pos=A_POS,
                   causal=causal)
        ref = minus_inf_reference(q, k, v, causal)
        for order in ((A, A_POS), (B, B_POS)), ((B, B_POS), (A, A_POS)):
            out, lse = np.zeros(q.shape, dtype), np.full((1, 2, 6), -np.inf, lse_dt)
            for s, kp in order:
                K.forward(q, k[:, s], v[:, s], out, lse, q_pos=Q_POS, k_pos=kp, causal=causal, accumulate=True)
            minus_inf_expectations((out_a, lse_a), (out, lse), (dq, dk, dv), ref, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_cuda_emulated_minus_inf_row_is_nan_then_merged_away(cuda, causal):  # noqa: F811
    rng = np.random.default_rng()
    q, k, v, dout = minus_inf_case(rng, np.float32)
    dev = lambda x: FakeDeviceArray(np.ascontiguousarray(x, np.float32))  # noqa: E731
    with np.errstate(all="ignore"):
        out_a, lse_a = dev(np.full(q.shape, np.nan)), dev(np.full((1, 2, 6), np.nan))
        cuda.forward(dev(q), dev(k[:, A]), dev(v[:, A]), out_a, lse_a, Q_POS, A_POS, causal=causal)
        dq, dk, dv = (dev(np.zeros(a.shape)) for a in (q, k[:, A], v[:, A]))
        dlt = cuda.delta(dev(dout), out_a, into=dev(np.full((1, 2, 6), np.nan)))
        cuda.backward(dev(dout), dev(q), dev(k[:, A]), dev(v[:, A]), lse_a, dlt, dq, dk, dv, q_pos=Q_POS,
                      k_pos=A_POS, causal=causal)
        ref = minus_inf_reference(q, k, v, causal)
        for order in ((A, A_POS), (B, B_POS)), ((B, B_POS), (A, A_POS)):
            out, lse = dev(np.zeros(q.shape)), dev(np.full((1, 2, 6), -np.inf))
            for s, kp in order:
                cuda.forward(dev(q), dev(k[:, s]), dev(v[:, s]), out, lse, Q_POS, kp, causal=causal, accumulate=True)
            minus_inf_expectations((out_a.get(), lse_a.get()), (out.get(), lse.get()),
                                   tuple(a.get() for a in (dq, dk, dv)), ref, causal)
