"""CUDA kernels on a real GPU against the float64 reference (marked gpu; skipped without CuPy/GPU).

float32 < 1e-5 relative error; float16 / bfloat16 within 2x the error of a same-precision naive
computation. Outputs are NaN-poisoned before each block-level call. bfloat16 arrays are uint16 CuPy
arrays exported with typestr '<V2' and a bfloat16 dtype name (what ml_dtypes-backed arrays export),
so the kernel tests do not depend on CuPy's own bfloat16 support. The public API and Ring tests at
the end take CuPy arrays as users hand them (bfloat16: CuPy's ml_dtypes dtype): device in, device out.
benchmarks/gpu/run.sh runs this file on a GPU machine, where a skip counts as a failure.
"""
import numpy as np
import pytest

from ringattn import device, reference

pytestmark = pytest.mark.gpu
cp = pytest.importorskip("cupy", reason="CuPy is not installed")
from ringattn import cuda  # noqa: E402
from ringattn.backends import cuda as cuda_backend  # noqa: E402

try:
    cuda_backend.module()
except RuntimeError as e:  # built without nvcc: the first use says so
    pytest.skip(f"ringattn._cuda not built: {e}", allow_module_level=True)
if cuda.device_count() == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

from test_cuda_emulated import ffn_ref, naive_same_precision, qkv, rounded  # noqa: E402

rng = np.random.default_rng()


BF16 = device.BFloat16Array


def dev(x, dtype):
    if dtype == "bfloat16":
        return BF16(cp.asarray(device.to_bfloat16_bits(x)))
    return cp.asarray(np.ascontiguousarray(x, dtype=dtype))


def nan_dev(shape, dtype):
    if dtype == "bfloat16":
        return BF16(cp.full(shape, 0x7FC0, cp.uint16))
    return cp.full(shape, np.nan, dtype=dtype)


def host(a):
    return a.get()


def run_forward(q, k, v, causal, dtype, out_dtype=None):
    b, sq, h, d = q.shape
    out = nan_dev(q.shape, out_dtype or dtype)
    lse = cp.full((b, h, sq), np.nan, cp.float32)
    cuda.forward(dev(q, dtype), dev(k, dtype), dev(v, dtype), out, lse, q_pos=(k.shape[1] - sq, 1), causal=causal)
    return host(out), host(lse)


def run_backward(dout, q, k, v, causal, dtype):
    b, sq, h, d = q.shape
    out, lse = nan_dev(q.shape, dtype), cp.full((b, h, sq), np.nan, cp.float32)
    Q, K, V, dO = dev(q, dtype), dev(k, dtype), dev(v, dtype), dev(dout, dtype)
    pos = (k.shape[1] - sq, 1)
    cuda.forward(Q, K, V, out, lse, q_pos=pos, causal=causal)
    dlt = cuda.delta(dO, out, into=cp.full((b, h, sq), np.nan, cp.float32))
    dq, dk, dv = (cp.zeros(a.shape, cp.float32) for a in (q, k, v))
    cuda.backward(dO, Q, K, V, lse, dlt, dq, dk, dv, q_pos=pos, causal=causal)
    return host(dq), host(dk), host(dv)


SHAPES = [  # b, sq, sk, h, hkv, d, causal
    (2, 97, 97, 4, 2, 59, True), (1, 1025, 1025, 2, 1, 64, True), (1, 33, 1025, 2, 2, 128, True),
    (1, 1025, 97, 2, 2, 128, True), (1, 1, 70, 3, 1, 1, False), (2, 200, 300, 4, 4, 256, False),
    (1, 513, 513, 8, 2, 128, False),
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", SHAPES)
def test_forward_backward_float32(b, sq, sk, h, hkv, d, causal):
    q, k, v = qkv(b, sq, sk, h, hkv, d)
    dout = rng.standard_normal(q.shape)
    out, lse = run_forward(q, k, v, causal, "float32")
    ro, rl = reference.attention_forward(q, k, v, causal=causal)
    assert reference.rel_error(out, ro) < 1e-5
    fin = np.isfinite(rl)
    assert np.array_equal(np.isfinite(lse), fin) and reference.rel_error(lse[fin], rl[fin]) < 1e-5
    for got, ref in zip(run_backward(dout, q, k, v, causal, "float32"),
                        reference.attention_backward(dout, q, k, v, causal=causal)):
        assert reference.rel_error(got, ref) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_16bit_within_2x_of_naive(dtype, causal, d):
    b, s, h, hkv = 1, 257, 4, 2
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    out, _ = run_forward(q, k, v, causal, dtype)
    naive = naive_same_precision(q, k, v, causal, dtype, dout)
    ro = reference.attention_forward(q, k, v, causal=causal)[0]
    assert reference.rel_error(out, ro) <= 2 * reference.rel_error(naive[0], ro)
    for got, ref, nv in zip(run_backward(dout, q, k, v, causal, dtype),
                            reference.attention_backward(dout, q, k, v, causal=causal), naive[1:]):
        assert reference.rel_error(got, ref) <= 2 * reference.rel_error(nv, ref)


def test_accumulate_over_blocks_with_positions_float32_accumulator():
    """The ring's use: bf16 inputs, a float32 running (out, lse), striped positions, 3 key blocks."""
    b, s, h, d = 1, 300, 4, 128
    q, k, v = (rounded(x, "bfloat16") for x in qkv(b, s, 3 * s, h, h, d))
    out, lse = nan_dev(q.shape, "float32"), cp.full((b, h, s), np.nan, cp.float32)
    for r in range(3):  # key block r holds positions r, r + 3, r + 6, ...; queries 1, 4, 7, ...
        sl = slice(r * s, (r + 1) * s)
        cuda.forward(dev(q, "bfloat16"), dev(k[:, sl], "bfloat16"), dev(v[:, sl], "bfloat16"), out, lse,
                     q_pos=(1, 3), k_pos=(r, 3), causal=True, accumulate=r > 0)
    kp = np.concatenate([reference.positions(s, r, 3) for r in range(3)])
    ro, rl = reference.attention_forward(q, k, v, causal=True, q_pos=reference.positions(s, 1, 3), k_pos=kp)
    assert reference.rel_error(host(out), ro) < 1e-5
    assert reference.rel_error(host(lse), rl) < 1e-5


def test_public_api_cupy_in_cupy_out_on_a_side_stream():
    q, k, v = qkv(2, 129, 129, 4, 2, 64)
    dout = rng.standard_normal(q.shape)
    with cp.cuda.Stream(non_blocking=True) as s:
        Q, K, V, dO = (cp.asarray(x, cp.float32) for x in (q, k, v, dout))
        import ringattn
        out, lse = ringattn.attention_forward(Q, K, V, causal=True)
        dq, dk, dv = ringattn.attention_backward(dO, Q, K, V, out, lse, causal=True)
        s.synchronize()
    assert isinstance(out, cp.ndarray) and out.dtype == cp.float32 and lse.dtype == cp.float32
    assert reference.rel_error(out.get(), reference.attention_forward(q, k, v, causal=True)[0]) < 1e-5
    for got, ref in zip((dq, dk, dv), reference.attention_backward(dout, q, k, v, causal=True)):
        assert got.dtype == cp.float32 and reference.rel_error(got.get(), ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2.0**-8)])
def test_ffn(dtype, tol):
    tokens, width, hidden, chunk = 1025, 96, 384, 256
    r = lambda a: rounded(a, dtype)  # noqa: E731
    x, dy = r(rng.standard_normal((tokens, width))), r(rng.standard_normal((tokens, width)))
    w1, w2 = r(rng.standard_normal((width, hidden)) / 10), r(rng.standard_normal((hidden, width)) / 20)
    b1, b2 = r(rng.standard_normal(hidden)), r(rng.standard_normal(width))
    D = lambda a: dev(a, dtype)  # noqa: E731
    y = cuda.ffn_forward(D(x), D(w1), D(b1), D(w2), D(b2), chunk=chunk, out=nan_dev((tokens, width), dtype))
    grads = [cp.zeros(a.shape, cp.float32) for a in (w1, b1, w2, b2)]
    dx = cuda.ffn_backward(D(x), D(w1), D(b1), D(w2), D(b2), D(dy), *grads, chunk=chunk,
                           dx=nan_dev((tokens, width), dtype))
    ry, rdx, *rg = ffn_ref(x, w1, b1, w2, b2, dy)
    assert reference.rel_error(host(y), ry) < tol
    assert reference.rel_error(np.asarray(host(dx), np.float64), rdx) < tol
    for got, ref in zip(grads, rg):
        assert reference.rel_error(got.get(), ref) < 1e-4


# ---- the public API and the Ring over CuPy arrays (device in, device out) -------------------------
def cupy_array(x, dtype):
    """A CuPy array of `dtype` (bfloat16: CuPy's own, from ml_dtypes) holding x rounded to it."""
    import ml_dtypes

    hd = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    return cp.asarray(np.asarray(x).astype(hd))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_public_api_16bit_cupy_in_cupy_out(dtype):
    q, k, v = (rounded(x, dtype) for x in qkv(1, 130, 130, 4, 2, 64))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    Q, K, V, dO = (cupy_array(x, dtype) for x in (q, k, v, dout))
    import ringattn

    out, lse = ringattn.attention_forward(Q, K, V, causal=True)
    grads = ringattn.attention_backward(dO, Q, K, V, out, lse, causal=True)
    assert isinstance(out, cp.ndarray) and out.dtype == Q.dtype and lse.dtype == cp.float32
    naive = naive_same_precision(q, k, v, True, dtype, dout)
    ro = reference.attention_forward(q, k, v, causal=True)[0]
    assert reference.rel_error(out.get().astype(np.float64), ro) <= 2 * reference.rel_error(naive[0], ro)
    for got, ref, nv in zip(grads, reference.attention_backward(dout, q, k, v, causal=True), naive[1:]):
        assert isinstance(got, cp.ndarray) and got.dtype == Q.dtype
        assert reference.rel_error(got.get().astype(np.float64), ref) <= 2 * reference.rel_error(nv, ref)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_one_rank_cupy_in_cupy_out(layout, dtype):
    """Ring on MPI.COMM_SELF with CuPy shards: device arrays in and out, equal to single-process."""
    from mpi4py import MPI

    import ringattn

    q, k, v = (rounded(x, dtype) if dtype != "float32" else x for x in qkv(1, 77, 77, 4, 2, 64))
    dout = rng.standard_normal(q.shape)
    ring = ringattn.Ring(MPI.COMM_SELF, layout=layout)
    Q, K, V, dO = (ring.shard(cupy_array(x, dtype)) for x in (q, k, v, dout))
    assert all(isinstance(a, cp.ndarray) for a in (Q, K, V, dO))
    out, lse = ring.attention_forward(Q, K, V, causal=True)
    dq, dk, dv = ring.attention_backward(dO, Q, K, V, out, lse, causal=True)
    so, sl = ringattn.attention_forward(Q, K, V, causal=True)  # one rank: the shard is the sequence
    sg = ringattn.attention_backward(dO, Q, K, V, so, sl, causal=True)
    for got, want in zip((out, dq, dk, dv), (so, *sg)):
        full = ring.unshard(got)
        assert isinstance(full, cp.ndarray) and full.dtype == want.dtype
        tol = 1e-5 if dtype == "float32" else 2.0**-7
        assert reference.rel_error(full.get().astype(np.float64), want.get().astype(np.float64)) < tol
