"""The CUDA kernels' logic, checked on the CPU: cuda/*.cu built as C++ with -DRA_EMULATE.

The emulated module runs each CUDA thread as a host thread (__syncthreads = barrier), on host memory
behind FakeDeviceArray, through the real ringattn.cuda Python layer and the real bindings. It checks
indexing, masking, tiling, the LSE merge, GQA, strides and dtypes against the float64 reference;
it says nothing about speed or about compiler/hardware issues (those need `benchmarks/gpu/run.sh`).
Built once per source hash into build/emu/ (about 15 s of compiler time).
"""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest

from ringattn import device, reference
from ringattn.device import bfloat16, from_bfloat16_bits, to_bfloat16_bits
from fake_device import FakeDeviceArray

ROOT = Path(__file__).resolve().parents[1]
# every kernel file of cuda/ (as CMakeLists.txt globs them) and the bindings; the headers for the cache key
SOURCES = [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda").glob("*.cu")), "cuda/bindings.cpp"]
HEADERS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "cuda").glob("*.[ch]*") if p.suffix in (".cuh", ".hpp"))
HEADERS += ["cpp/mask.hpp", "cpp/attn_params.hpp"]  # shared with the CPU kernels
CUDA_INCLUDE = Path("/usr/local/cuda/include")


def _cuda_include():
    for p in (CUDA_INCLUDE, *Path("/usr/local").glob("cuda-*/include")):
        if (p / "cuda_fp16.h").exists():
            return p
    nvcc = shutil.which("nvcc")
    if nvcc:
        p = Path(nvcc).resolve().parents[1] / "include"
        if (p / "cuda_fp16.h").exists():
            return p
    return None


def build_emulated():
    """Compile the emulated module (cached by source hash) and import it."""
    inc = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if inc is None or cxx is None:
        pytest.skip("needs the CUDA headers (cuda_fp16.h) and a C++20 compiler")
    import pybind11

    h = hashlib.sha256()
    for f in SOURCES + HEADERS:
        h.update((ROOT / f).read_bytes())
    out_dir = ROOT / "build" / "emu" / h.hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    lib = out_dir / f"_cuda_emu{suffix}"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"tmp{os.getpid()}{suffix}"  # concurrent builds each rename their own file
        cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-DRA_EMULATE", "-DRA_MODULE_NAME=_cuda_emu",
               f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}", f"-I{inc}", "-x", "c++",
               *[str(ROOT / s) for s in SOURCES], "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"emulated build failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}"
        tmp.rename(lib)
    spec = importlib.util.spec_from_file_location("_cuda_emu", lib)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HostBackend:
    """The subset of CuPy ringattn.cuda uses (empty, zeros, ascontiguousarray, the current stream) over
    host memory; new arrays are poisoned with NaN."""

    def empty(self, shape, dtype):
        if dtype is bfloat16:
            return FakeDeviceArray(np.full(shape, 0x7FC0, np.uint16), dtype=bfloat16)  # bf16 NaN
        return FakeDeviceArray(np.full(shape, np.nan, dtype))

    def zeros(self, shape, dtype):
        if dtype is bfloat16:
            return FakeDeviceArray(np.zeros(shape, np.uint16), dtype=bfloat16)
        return FakeDeviceArray(np.zeros(shape, dtype))

    def ascontiguousarray(self, a):
        return FakeDeviceArray(np.ascontiguousarray(a.host), dtype=a.dtype if a.dtype is bfloat16 else None)

    cuda = types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(ptr=0))


@pytest.fixture(scope="module")
def cuda(monkeypatch_module):
    emu = build_emulated()
    try:
        import ringattn._cuda  # noqa: F401
    except ImportError:  # built without nvcc: let ringattn.cuda import on top of the emulated module
        monkeypatch_module.setitem(sys.modules, "ringattn._cuda", emu)
    from ringattn import cuda as cu
    from ringattn.backends import cuda as backend

    # ringattn.cuda asks backends.cuda for its kernels module and array module (CuPy's names)
    monkeypatch_module.setattr(backend._state, "module", emu)
    monkeypatch_module.setattr(backend._state, "xp", HostBackend())
    return cu


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


rng = np.random.default_rng()

# ---- precision helpers ----------------------------------------------------------------------------
def to_dev(x, dtype):
    """float64 host data -> FakeDeviceArray of dtype ('float16' | 'bfloat16' | 'float32')."""
    if dtype == "bfloat16":
        return FakeDeviceArray(to_bfloat16_bits(x), dtype=bfloat16)
    return FakeDeviceArray(np.ascontiguousarray(x, dtype=dtype))


def rounded(x, dtype):
    """x rounded to dtype, returned as float64."""
    if dtype == "bfloat16":
        return from_bfloat16_bits(to_bfloat16_bits(x)).astype(np.float64)
    return np.asarray(x, dtype=dtype).astype(np.float64)


def naive_same_precision(q, k, v, causal, dtype, dout=None, vis=None):
    """Attention computed in `dtype` step by step (every intermediate rounded): the error budget a
    16-bit kernel is held to (it must be within 2x of this one's error). vis: a (seq_q, seq_k) bool
    mask used instead of the bottom-right causal one (windows, explicit positions)."""
    r = lambda x: rounded(x, dtype)  # noqa: E731
    b, sq, h, d = q.shape
    sk = k.shape[1]
    ke, ve = np.repeat(k, h // k.shape[2], 2), np.repeat(v, h // k.shape[2], 2)
    s = r(np.einsum("bihd,bjhd->bhij", q, ke) / np.sqrt(d))
    if vis is not None:
        s = np.where(vis, s, -np.inf)
    elif causal:
        s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = r(np.exp(s - m))
    p = r(e / e.sum(-1, keepdims=True))
    out = r(np.einsum("bhij,bjhd->bihd", p, ve))
    if dout is None:
        return out
    dv = r(np.einsum("bhij,bihd->bjhd", p, dout))
    dp = r(np.einsum("bihd,bjhd->bhij", dout, ve))
    dlt = r(np.einsum("bihd,bihd->bhi", dout, out))
    ds = r(p * (dp - dlt[..., None]) / np.sqrt(d))
    dq = r(np.einsum("bhij,bjhd->bihd", ds, ke))
    dk = r(np.einsum("bhij,bihd->bjhd", ds, q))
    g = h // k.shape[2]
    return out, dq, r(dk.reshape(b, sk, -1, g, d).sum(3)), r(dv.reshape(b, sk, -1, g, d).sum(3))


def qkv(b, sq, sk, h, hkv, d):
    return rng.standard_normal((b, sq, h, d)), rng.standard_normal((b, sk, hkv, d)), rng.standard_normal((b, sk, hkv, d))


# ---- attention forward ------------------------------------------------------------------------------
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", [
    (2, 97, 97, 4, 2, 59, True),    # GQA, awkward sizes, DMAX 64
    (1, 33, 97, 2, 2, 64, True),    # seq_q < seq_k: bottom-right causal
    (1, 97, 33, 2, 1, 64, True),    # seq_q > seq_k: first rows fully masked (out 0, lse -inf)
    (1, 1, 70, 3, 1, 1, False),     # seq 1, head dim 1, MQA
    (1, 40, 50, 2, 2, 128, False),  # DMAX 128
    (1, 20, 30, 1, 1, 200, True),   # DMAX 256
])
def test_forward_float32(cuda, b, sq, sk, h, hkv, d, causal):
    q, k, v = qkv(b, sq, sk, h, hkv, d)
    out, lse = cuda.attention_forward(to_dev(q, "float32"), to_dev(k, "float32"), to_dev(v, "float32"), causal=causal)
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    assert reference.rel_error(out.get(), ref_out) < 1e-5
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse.get()), fin)
    assert reference.rel_error(lse.get()[fin], ref_lse[fin]) < 1e-5
    if not fin.all():
        assert np.all(out.get()[np.moveaxis(~fin, 1, 2)] == 0)


def test_forward_positions_and_accumulate(cuda):
    """Striped positions and the ring's merge: two K/V blocks folded into a running (out, lse),
    including rows that see nothing in the first block, equal attention over all keys at once."""
    b, s, h, d = 1, 45, 2, 32
    q, k, v = qkv(b, s, 2 * s, h, h, d)
    qp = reference.positions(s, 1, 2)                          # queries at 1, 3, 5, ...
    kp1, kp2 = reference.positions(s, 0, 2), reference.positions(s, 40, 2)  # two key blocks
    out = FakeDeviceArray(np.full((b, s, h, d), np.nan, np.float32))
    lse = FakeDeviceArray(np.full((b, h, s), np.nan, np.float32))
    dev = lambda x: to_dev(x, "float32")  # noqa: E731
    cuda.forward(dev(q), dev(k[:, :s]), dev(v[:, :s]), out, lse, (1, 2), (0, 2), causal=True)
    cuda.forward(dev(q), dev(k[:, s:]), dev(v[:, s:]), out, lse, (1, 2), (40, 2), causal=True, accumulate=True)
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=True, q_pos=qp, k_pos=np.concatenate([kp1, kp2]))
    assert reference.rel_error(out.get(), ref_out) < 1e-5
    assert reference.rel_error(lse.get(), ref_lse) < 1e-5
    # A block that is entirely in the future of every query leaves (out, lse) as they were.
    before = out.get(), lse.get()
    cuda.forward(dev(q), dev(k[:, s:]), dev(v[:, s:]), out, lse, (1, 2), (1000, 1), causal=True, accumulate=True)
    assert np.array_equal(out.get(), before[0]) and np.array_equal(lse.get(), before[1])


def test_forward_strided_views_and_float32_accumulator(cuda):
    """Inputs that are strided views (the ring passes slices of a packed K/V buffer) and a float32
    `out` for 16-bit inputs."""
    b, s, h, d = 2, 50, 2, 40
    q, k, v = qkv(b, s, s, h, h, d)
    kv = np.stack([k, v], axis=2).astype(np.float16)  # (b, s, 2, h, d): K and V interleaved
    kd = FakeDeviceArray(kv[:, :, 0])
    vd = FakeDeviceArray(kv[:, :, 1])
    assert not kv[:, :, 0].flags.c_contiguous
    out = FakeDeviceArray(np.full((b, s, h, d), np.nan, np.float32))
    lse = FakeDeviceArray(np.full((b, h, s), np.nan, np.float32))
    cuda.forward(to_dev(q, "float16"), kd, vd, out, lse, causal=False)
    ref_out, _ = reference.attention_forward(rounded(q, "float16"), rounded(k, "float16"), rounded(v, "float16"))
    assert reference.rel_error(out.get(), ref_out) < 1e-5  # fp16 inputs, float32 math and output


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_16bit_within_2x_of_naive(cuda, dtype, causal):
    b, s, h, hkv, d = 1, 97, 4, 2, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    out, lse = cuda.attention_forward(to_dev(q, dtype), to_dev(k, dtype), to_dev(v, dtype), causal=causal)
    ref_out, ref_lse = reference.attention_forward(q, k, v, causal=causal)
    err = reference.rel_error(out.get(), ref_out)
    err_naive = reference.rel_error(naive_same_precision(q, k, v, causal, dtype), ref_out)
    assert err <= 2 * err_naive, (err, err_naive)
    assert reference.rel_error(lse.get(), ref_lse) < 1e-5  # lse is float32 from exact 16-bit inputs


# ---- attention backward -----------------------------------------------------------------------------
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", [
    (2, 97, 97, 4, 2, 59, True),
    (1, 33, 97, 2, 1, 64, True),
    (1, 97, 33, 2, 2, 16, True),    # fully masked rows contribute nothing
    (1, 1, 40, 2, 2, 1, False),
    (1, 30, 20, 2, 2, 128, False),
    (1, 12, 20, 2, 1, 256, True),
])
def test_backward_float32(cuda, b, sq, sk, h, hkv, d, causal):
    q, k, v = qkv(b, sq, sk, h, hkv, d)
    dout = rng.standard_normal(q.shape)
    dev = lambda x: to_dev(x, "float32")  # noqa: E731
    out, lse = cuda.attention_forward(dev(q), dev(k), dev(v), causal=causal)
    dq, dk, dv = cuda.attention_backward(dev(dout), dev(q), dev(k), dev(v), out, lse, causal=causal)
    rq, rk, rv = reference.attention_backward(dout, q, k, v, causal=causal)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert reference.rel_error(got.get(), ref) < 1e-5


def test_backward_accumulates_with_positions(cuda):
    """backward adds (+=) into dq, dk, dv; two key blocks with striped positions sum to the full gradient."""
    b, s, h, d = 1, 37, 2, 24
    q, k, v = qkv(b, s, 2 * s, h, h, d)
    dout = rng.standard_normal(q.shape)
    qp, kp = reference.positions(s, 0, 2), reference.positions(2 * s, 0, 1)
    rq, rk, rv = reference.attention_backward(dout, q, k, v, causal=True, q_pos=qp, k_pos=kp)
    ro, rl = reference.attention_forward(q, k, v, causal=True, q_pos=qp, k_pos=kp)
    f = lambda x: FakeDeviceArray(np.ascontiguousarray(x, np.float32))  # noqa: E731
    lse, dlt = f(rl), cuda.delta(f(dout), f(ro), into=FakeDeviceArray(np.full((b, h, s), np.nan, np.float32)))
    assert reference.rel_error(dlt.get(), np.einsum("bihd,bihd->bhi", dout, ro)) < 1e-5
    dq = FakeDeviceArray(np.zeros(q.shape, np.float32))
    dk = FakeDeviceArray(np.zeros(k.shape, np.float32))
    dv = FakeDeviceArray(np.zeros(v.shape, np.float32))
    for j0 in (0, s):  # dk, dv as views of the full buffers: strided writes
        cuda.backward(f(dout), f(q), f(k[:, j0:j0 + s]), f(v[:, j0:j0 + s]), lse, dlt, dq, dk[:, j0:j0 + s],
                      dv[:, j0:j0 + s], q_pos=(0, 2), k_pos=(j0, 1), causal=True)
    for got, ref in ((dq, rq), (dk, rk), (dv, rv)):
        assert reference.rel_error(got.get(), ref) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_backward_16bit_within_2x_of_naive(cuda, dtype):
    b, s, h, hkv, d = 1, 70, 2, 1, 64
    q, k, v = (rounded(x, dtype) for x in qkv(b, s, s, h, hkv, d))
    dout = rounded(rng.standard_normal(q.shape), dtype)
    dev = lambda x: to_dev(x, dtype)  # noqa: E731
    out, lse = cuda.attention_forward(dev(q), dev(k), dev(v), causal=True)
    grads = cuda.attention_backward(dev(dout), dev(q), dev(k), dev(v), out, lse, causal=True)
    refs = reference.attention_backward(dout, q, k, v, causal=True)
    naive = naive_same_precision(q, k, v, True, dtype, dout)[1:]
    for got, ref, nv in zip(grads, refs, naive):
        assert got.dtype is bfloat16 if dtype == "bfloat16" else got.dtype == np.dtype(dtype)
        err, err_naive = reference.rel_error(got.get(), ref), reference.rel_error(nv, ref)
        assert err <= 2 * err_naive, (err, err_naive)


def test_public_api_routes_device_arrays(cuda, monkeypatch):
    """ringattn.attention_forward/backward on device arrays go through ringattn.cuda."""
    import ringattn

    q, k, v = qkv(1, 20, 20, 2, 2, 16)
    dev = lambda x: to_dev(x, "float32")  # noqa: E731
    out, lse = ringattn.attention_forward(dev(q), dev(k), dev(v), causal=True)
    assert isinstance(out, FakeDeviceArray)
    assert reference.rel_error(out.get(), reference.attention_forward(q, k, v, causal=True)[0]) < 1e-5
    dq, _, _ = ringattn.attention_backward(dev(q), dev(q), dev(k), dev(v), out, lse, causal=True)
    assert reference.rel_error(dq.get(), reference.attention_backward(q, q, k, v, causal=True)[0]) < 1e-5


# ---- feed-forward -----------------------------------------------------------------------------------


ffn_ref = reference.ffn  # the one float64 FFN reference (y, dx, dw1, db1, dw2, db2)


@pytest.mark.parametrize("tokens,width,hidden,chunk", [(97, 24, 70, 32), (1, 5, 3, 256), (130, 64, 130, 130)])
def test_ffn_float32(cuda, tokens, width, hidden, chunk):
    x = rng.standard_normal((tokens, width))
    w1, w2 = rng.standard_normal((width, hidden)) / np.sqrt(width), rng.standard_normal((hidden, width)) / np.sqrt(hidden)
    b1, b2, dy = rng.standard_normal(hidden), rng.standard_normal(width), rng.standard_normal((tokens, width))
    f = lambda a: FakeDeviceArray(np.ascontiguousarray(a, np.float32))  # noqa: E731
    y = cuda.ffn_forward(f(x), f(w1), f(b1), f(w2), f(b2), chunk=chunk)
    g0 = [rng.standard_normal(a.shape) for a in (w1, b1, w2, b2)]  # backward accumulates into these
    grads = [f(a) for a in g0]
    dx = cuda.ffn_backward(f(x), f(w1), f(b1), f(w2), f(b2), f(dy), *grads, chunk=chunk)
    ry, rdx, rdw1, rdb1, rdw2, rdb2 = ffn_ref(x, w1, b1, w2, b2, dy)
    assert reference.rel_error(y.get(), ry) < 1e-5
    assert reference.rel_error(dx.get(), rdx) < 1e-5
    for got, start, ref in zip(grads, g0, (rdw1, rdb1, rdw2, rdb2)):
        assert reference.rel_error(got.get(), start + ref) < 1e-5


def test_ffn_bfloat16_float32_grads(cuda):
    tokens, width, hidden = 50, 16, 40
    x = rounded(rng.standard_normal((tokens, width)), "bfloat16")
    w1 = rounded(rng.standard_normal((width, hidden)) / 4, "bfloat16")
    w2 = rounded(rng.standard_normal((hidden, width)) / 6, "bfloat16")
    b1, b2 = rounded(rng.standard_normal(hidden), "bfloat16"), rounded(rng.standard_normal(width), "bfloat16")
    dy = rounded(rng.standard_normal((tokens, width)), "bfloat16")
    b = lambda a: to_dev(a, "bfloat16")  # noqa: E731
    y = cuda.ffn_forward(b(x), b(w1), b(b1), b(w2), b(b2), chunk=16)
    grads = [FakeDeviceArray(np.zeros(a.shape, np.float32)) for a in (w1, b1, w2, b2)]
    dx = cuda.ffn_backward(b(x), b(w1), b(b1), b(w2), b(b2), b(dy), *grads, chunk=16)
    ry, rdx, *rg = ffn_ref(x, w1, b1, w2, b2, dy)
    # float32 math on exact bf16 inputs: only the final rounding of y and dx to bf16 (2^-9) remains.
    assert reference.rel_error(y.get(), ry) < 2**-8
    assert reference.rel_error(dx.get(), rdx) < 2**-8
    for got, ref in zip(grads, rg):
        assert reference.rel_error(got.get(), ref) < 1e-5


def test_interface_descriptor_roundtrip(cuda):
    """The descriptor handed to the bindings points at the array's first element with byte strides."""
    host = np.zeros((4, 6, 3), np.float32)[:, ::2]
    d = device.describe(FakeDeviceArray(host), "x")
    assert d.ptr == host.__array_interface__["data"][0] and d.strides == host.strides and d.shape == host.shape
