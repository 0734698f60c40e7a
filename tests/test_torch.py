"""ringattn.torch: autograd ops against torch's own scaled_dot_product_attention, flash-attn's
signature, zero-copy CPU hand-over, CUDA dispatch with stand-ins, the plain API's conversion, the
sharding helpers and the ring op / a training step under mpiexec (tests/mpi_programs/torch_*.py)."""
import inspect
import os
import subprocess
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional: pip install torch)")
import torch.nn.functional as F  # noqa: E402

import ringattn  # noqa: E402
import ringattn.interop  # noqa: E402
import ringattn.torch as rt  # noqa: E402
from ringattn import backends  # noqa: E402
from mpi_util import run_file  # noqa: E402


def rel(a, b):
    """||a - b|| / ||b||; ||a - b|| when b is exactly zero (dq with a single key: a is rounding noise).
    Inputs here are unit normal, so every nonzero reference has a norm far above 1."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float((a - b).norm() / max(float(b.norm()), 1.0))


def sdpa(q, k, v, causal=False, scale=None):
    """torch's attention in flash-attn's layout; GQA by repeating k/v heads; causal bottom-right aligned."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    sq, sk = q.shape[1], k.shape[1]
    mask = None
    if causal:
        pos = lambda n: torch.arange(n, device=q.device)  # noqa: E731
        mask = pos(sk)[None, :] <= pos(sq)[:, None] + (sk - sq)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def inputs(b, sq, sk, h, hk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda s, heads: torch.randn(b, s, heads, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(sq, h), mk(sk, hk), mk(sk, hk)


def test_import_ringattn_does_not_import_torch():
    code = ("import sys, ringattn, ringattn.api, ringattn.ring, ringattn.backends, ringattn.layers, ringattn.interop; "
            "ringattn.attention_forward; ringattn.Ring; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- against torch's SDPA --------------------------------------------------------------------------
SHAPES = [  # (batch, seq_q, seq_k, heads, heads_kv, dim)
    (2, 97, 97, 4, 2, 59),
    (1, 1, 1, 2, 1, 1),
    (1, 97, 97, 3, 3, 1),
    (2, 1, 1, 4, 1, 59),
    (1, 5, 9, 2, 1, 7),    # cross-length: bottom-right causal
    (1, 9, 5, 2, 2, 8),    # more queries than keys: early causal rows see no key
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_match_sdpa_float64(shape, causal):
    b, sq, sk, h, hk, d = shape
    q, k, v = inputs(b, sq, sk, h, hk, d, seed=sum(shape) + causal)
    out = rt.attention(q, k, v, causal=causal)
    ref = sdpa(q, k, v, causal=causal)
    if causal and sq > sk:  # rows that see no key: SDPA gives NaN, flash-attn (and we) give 0
        empty = torch.arange(sq) + (sk - sq) < 0
        ref = torch.where(empty[None, :, None, None], torch.zeros_like(ref), ref)
        assert torch.all(out[:, empty] == 0)
    assert out.dtype == torch.float64 and out.shape == q.shape
    assert rel(out, ref) < 1e-12
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, a, w in zip("qkv", got, want):
        assert a.shape == w.shape and a.dtype == torch.float64
        assert rel(a, w) < 1e-12, name


@pytest.mark.parametrize("causal", [False, True])
def test_float32_within_1e5_of_float64_sdpa(causal):
    q, k, v = inputs(2, 97, 97, 4, 2, 59, seed=3)
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    out = rt.attention(q32, k32, v32, causal=causal)
    assert out.dtype == torch.float32
    ref = sdpa(q, k, v, causal=causal)
    assert rel(out, ref) < 1e-5
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, w in zip(torch.autograd.grad(out, (q32, k32, v32), dout.float()), torch.autograd.grad(ref, (q, k, v), dout)):
        assert a.dtype == torch.float32 and rel(a, w) < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = inputs(1, 6, 6, 2, 1, 3, seed=11)
    assert torch.autograd.gradcheck(lambda a, b, c: rt.attention(a, b, c, causal=causal, softmax_scale=0.7),
                                    (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_sum_backward_takes_expanded_grad_and_packed_views():
    """out.sum() hands backward an expanded (stride-0) gradient; q/k/v as views into one packed tensor."""
    qkv = torch.randn(2, 13, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.unbind(2)
    rt.attention(q, k, v, causal=True).sum().backward()
    ref = qkv.detach().clone().requires_grad_()
    sdpa(*ref.unbind(2), causal=True).sum().backward()
    assert rel(qkv.grad, ref.grad) < 1e-12


def test_lse_values_dtype_and_no_gradient():
    q, k, v = inputs(2, 7, 11, 4, 2, 5, seed=5)
    out, lse = rt.attention(q, k, v, softmax_scale=0.3, return_lse=True)
    kk = k.repeat_interleave(2, 2)
    want = torch.logsumexp(0.3 * torch.einsum("bqhd,bkhd->bhqk", q, kk), dim=-1)
    assert lse.shape == (2, 4, 7) and lse.dtype == torch.float64 and not lse.requires_grad
    assert rel(lse, want) < 1e-13
    _, lse32 = rt.attention(*(x.detach().float() for x in (q, k, v)), return_lse=True)
    assert lse32.dtype == torch.float32


# ---- flash-attn compatibility -----------------------------------------------------------------------
def test_flash_attn_func_signature_matches_flash_attn():
    want = [("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("v", inspect.Parameter.empty),
            ("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
            ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
    got = [(p.name, p.default) for p in inspect.signature(rt.flash_attn_func).parameters.values()]
    assert got == want


def test_flash_attn_func_returns():
    q, k, v = inputs(1, 9, 9, 2, 1, 4, seed=2)
    out = rt.flash_attn_func(q, k, v, 0.0, 0.5, True)  # positional, as flash-attn code calls it
    assert isinstance(out, torch.Tensor) and rel(out, sdpa(q, k, v, causal=True, scale=0.5)) < 1e-12
    res = rt.flash_attn_func(q, k, v, causal=True, softmax_scale=0.5, return_attn_probs=True)
    assert isinstance(res, tuple) and len(res) == 3 and res[2] is None
    out2, lse = rt.attention(q, k, v, causal=True, softmax_scale=0.5, return_lse=True)
    assert torch.equal(res[0], out2) and torch.equal(res[1], lse)


@pytest.mark.parametrize("kwargs, word", [
    (dict(dropout_p=0.1), "dropout_p"), (dict(softcap=30.0), "softcap"),
    (dict(alibi_slopes=torch.ones(2)), "alibi_slopes"), (dict(deterministic=True), "deterministic"),
])
def test_flash_attn_func_unsupported_args_raise(kwargs, word):
    q, k, v = inputs(1, 4, 4, 2, 2, 4)
    with pytest.raises(NotImplementedError, match=word):
        rt.flash_attn_func(q, k, v, **kwargs)


def windowed_sdpa(q, k, v, window, causal=False):
    """torch SDPA with an explicit mask: query i (at i + seq_k - seq_q) sees key j iff
    i' - left <= j <= i' + right (-1 unbounded; causal: right = 0), written here from the definition."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    sq, sk = q.shape[1], k.shape[1]
    left, right = window
    right = 0 if causal else right
    qi = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    mask = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        mask &= j >= qi - left
    if right >= 0:
        mask &= j <= qi + right
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("window, causal", [((3, 2), False), ((5, -1), True), ((-1, 4), False), ((0, 0), False)])
def test_window_size_matches_masked_sdpa(window, causal):
    q, k, v = inputs(2, 29, 29, 4, 2, 7, seed=11)
    out = rt.attention(q, k, v, causal=causal, window_size=window)
    want = windowed_sdpa(q, k, v, window, causal)
    assert rel(out, want) < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-11
    assert rel(rt.flash_attn_func(q, k, v, causal=causal, window_size=window), want) < 1e-12
    from mpi4py import MPI
    ring_out = rt.ring_attention(q, k, v, ringattn.Ring(MPI.COMM_SELF), causal=causal, window_size=window)
    assert rel(ring_out, want) < 1e-12


def test_window_size_errors_name_it():
    q, k, v = inputs(1, 4, 4, 2, 2, 4)
    with pytest.raises(TypeError, match="window_size"):
        rt.attention(q, k, v, window_size=3)
    with pytest.raises((ValueError, TypeError), match="window"):
        rt.attention(q, k, v, window_size=(-2, 0))
    assert rt.attention(q, k, v, window_size=[-1, -1]).shape == q.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_cpu_tensors_are_a_type_error(dtype):
    q, k, v = (x.detach().to(dtype) for x in inputs(1, 4, 4, 2, 2, 4))
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "") + ".*CPU"):
        rt.attention(q, k, v)


def test_argument_errors():
    q, k, v = inputs(1, 4, 4, 2, 2, 4)
    with pytest.raises(TypeError, match="k: expected a torch.Tensor, got ndarray"):
        rt.attention(q, k.detach().numpy(), v)
    with pytest.raises(TypeError, match="softmax_scale"):
        rt.attention(q, k, v, softmax_scale="0.5")
    with pytest.raises(ValueError, match="head dim mismatch"):
        rt.attention(q, k[..., :3], v[..., :3])
    with pytest.raises(TypeError, match="mixed dtypes"):
        rt.attention(q, k.float(), v)
    with pytest.raises(TypeError, match="ring: expected a ringattn.Ring, got NoneType"):
        rt.ring_attention(q, k, v, None)


# ---- zero-copy on the CPU ------------------------------------------------------------------------------
@pytest.fixture
def kernel_calls(monkeypatch):
    """Record (data pointer, last-axis contiguous) of the arrays each CPU kernel call receives."""
    calls = {"forward": [], "backward": []}
    for what, names in (("forward", ("q", "k", "v", "out")), ("backward", ("dout", "q", "k", "v"))):
        real = getattr(backends.cpu, what)

        def spy(*args, _real=real, _what=what, _names=names, **kw):
            calls[_what].append({n: (a.ctypes.data, a.strides[-1] == a.itemsize) for n, a in zip(_names, args)})
            return _real(*args, **kw)
        monkeypatch.setattr(backends.cpu, what, spy)
    return calls


def test_cpu_tensors_reach_the_kernels_without_copies(kernel_calls):
    qkv = torch.randn(2, 13, 3, 4, 8, dtype=torch.float64, requires_grad=True)  # strided views, last axis contiguous
    q, k, v = qkv.unbind(2)
    out = rt.attention(q, k, v, causal=True)
    (fwd,) = kernel_calls["forward"]
    assert {n: fwd[n][0] for n in "qkv"} == {"q": q.data_ptr(), "k": k.data_ptr(), "v": v.data_ptr()}
    assert fwd["out"][0] == out.data_ptr()  # the result tensor is the kernel's output array
    dout = torch.randn(out.shape, dtype=torch.float64)
    out.backward(dout)
    (bwd,) = kernel_calls["backward"]
    assert bwd["dout"][0] == dout.data_ptr() and bwd["q"][0] == q.data_ptr() and bwd["k"][0] == k.data_ptr()


def test_non_contiguous_last_axis_is_copied_once(kernel_calls):
    q = torch.randn(1, 7, 6, 2).transpose(2, 3)  # (1, 7, 2, 6) with last-axis stride 2
    k, v = torch.randn(1, 7, 2, 6), torch.randn(1, 7, 2, 6)
    assert q.stride(-1) != 1
    rt.attention(q, k, v)
    (fwd,) = kernel_calls["forward"]
    assert fwd["q"][1] and fwd["q"][0] != q.data_ptr()           # a contiguous copy
    assert fwd["k"][0] == k.data_ptr() and fwd["v"][0] == v.data_ptr()


# ---- CUDA tensors: dispatch and streams with stand-ins (no GPU here) ------------------------------------
def fake(device, dtype=torch.float32):
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype)


def test_bridge_dispatch():
    assert rt._bridge_for({"q": fake("cpu"), "k": fake("cpu")}) is rt._HOST
    assert rt._bridge_for({"q": fake("cuda:0", torch.bfloat16), "k": fake("cuda:0", torch.bfloat16)}) is rt._DEVICE
    with pytest.raises(TypeError, match="different devices.*q on cuda:0, k on cpu"):
        rt._bridge_for({"q": fake("cuda:0"), "k": fake("cpu")})
    with pytest.raises(TypeError, match="different devices"):
        rt._bridge_for({"q": fake("cuda:0"), "k": fake("cuda:1")})
    with pytest.raises(TypeError, match="float64 on the GPU"):
        rt._bridge_for({"q": fake("cuda:0", torch.float64)})
    with pytest.raises(TypeError, match="'meta' are not supported"):
        rt._bridge_for({"q": fake("meta")})


class FakeCupy:
    """The three CuPy names the CUDA bridge uses, over host memory; records the stream in effect."""

    def __init__(self):
        self.stream, self.device, self.seen = None, None, []
        outer = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                outer.device = self.index

            def __exit__(self, *exc):
                outer.device = None

        class ExternalStream:
            def __init__(self, ptr, device_id=-1):
                self.ptr = ptr

            def __enter__(self):
                outer.stream = self.ptr

            def __exit__(self, *exc):
                outer.stream = None

        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=ExternalStream)

    def from_dlpack(self, t):
        self.seen.append((self.stream, self.device, t.requires_grad))
        return np.from_dlpack(t)


def test_cuda_bridge_runs_on_torchs_current_stream(monkeypatch, kernel_calls):
    """The CUDA route end to end on CPU memory: CuPy stand-in, torch's stream handle 0xBEEF; every
    kernel call happens inside that stream and every tensor goes through DLPack detached."""
    cp = FakeCupy()
    monkeypatch.setattr(rt, "_cupy", lambda: cp)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0xBEEF))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    in_stream = []
    for what in ("forward", "backward"):
        spy = getattr(backends.cpu, what)
        monkeypatch.setattr(backends.cpu, what,
                            lambda *a, _spy=spy, **kw: (in_stream.append((cp.stream, cp.device)), _spy(*a, **kw))[1])

    class HostMemoryDevice(rt._Device):  # the CUDA bridge, with the CPU kernels' dtype rules
        backend = staticmethod(lambda: backends.cpu)
    monkeypatch.setitem(rt._BRIDGES, "cpu", HostMemoryDevice())
    q, k, v = inputs(1, 9, 9, 2, 1, 4, seed=4)
    out = rt.attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    assert in_stream == [(0xBEEF, 3)] * 2
    assert len(cp.seen) == 3 + 6 and all(s == (0xBEEF, 3, False) for s in cp.seen)
    ref = sdpa(*(x.detach().requires_grad_() for x in (q, k, v)), causal=True)
    assert rel(out, ref) < 1e-12


# ---- CUDA tensors on a real GPU (benchmarks/gpu/run.sh runs the gpu-marked tests; skipped elsewhere) ---
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        import ringattn.cuda  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ringattn._cuda not built: {e}")


def _slow_producer(dst, src):
    """On the current stream: spin, then dst <- src, so anything not ordered after it reads stale data."""
    torch.cuda._sleep(200_000_000)
    with torch.no_grad():
        dst.copy_(src)


@pytest.mark.gpu
def test_cuda_bf16_step_matches_sdpa_on_a_side_stream():
    """bf16 CUDA tensors produced late on a side stream: forward and backward run in that stream's
    order (no host synchronisation until the end) and are as close to the float64 reference as torch's
    own bf16 SDPA is (within 2x)."""
    _need_cuda()
    q64, k64, v64 = inputs(2, 257, 257, 8, 2, 64, seed=21)
    dout64 = torch.randn(q64.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(22))
    ref = sdpa(q64, k64, v64, causal=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout64)
    src = [x.detach().to("cuda", torch.bfloat16) for x in (q64, k64, v64, dout64)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        leaves = [torch.full_like(x, float("nan")) for x in src[:3]]
        for dst, x in zip(leaves, src[:3]):
            _slow_producer(dst, x)
        leaves = [x.requires_grad_() for x in leaves]
        out = rt.attention(*leaves, causal=True)
        out.backward(src[3])
        base = [x.detach().clone().requires_grad_() for x in src[:3]]
        theirs = sdpa(*base, causal=True)
        theirs.backward(src[3])
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.device.type == "cuda"
    assert rel(out.cpu(), ref) <= 2 * rel(theirs.cpu(), ref)
    for name, mine, t, r in zip("qkv", leaves, base, ref_grads):
        assert rel(mine.grad.cpu(), r) <= 2 * rel(t.grad.cpu(), r), name


@pytest.mark.gpu
def test_cuda_ring_attention_single_rank_equals_attention():
    """ring_attention on one rank (COMM_SELF) with float32 CUDA tensors equals attention and SDPA."""
    _need_cuda()
    from mpi4py import MPI
    ring = ringattn.Ring(MPI.COMM_SELF, layout="zigzag")
    q64, k64, v64 = inputs(1, 97, 97, 4, 2, 59, seed=23)
    ref = sdpa(q64, k64, v64, causal=True)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    q, k, v = (rt.shard(x.detach().to("cuda", torch.float32), ring).requires_grad_() for x in (q64, k64, v64))
    out = rt.ring_attention(q, k, v, ring, causal=True)
    out.backward(torch.ones_like(out))
    full = rt.unshard(out, ring)
    assert full.device.type == "cuda" and rel(full.cpu(), ref) < 1e-5
    for x, r in zip((q, k, v), ref_grads):
        assert rel(rt.unshard(x.grad, ring).cpu(), r) < 1e-5


# ---- the plain API's conversion (ringattn.interop, torch-free; re-exported by ringattn.torch) -------------
def test_as_array():
    assert rt.as_array is ringattn.interop.as_array
    a = np.ones((2, 3))
    assert rt.as_array(a) is a
    t = torch.randn(1, 5, 2, 4)
    x = rt.as_array(t, "q")
    assert isinstance(x, np.ndarray) and x.ctypes.data == t.data_ptr()  # DLPack: no copy
    dev = types.SimpleNamespace(__cuda_array_interface__={})
    assert rt.as_array(dev) is dev

    class ArrayInterface:
        def __init__(self, arr):
            self.__array_interface__ = arr.__array_interface__
    y = rt.as_array(ArrayInterface(a))
    assert isinstance(y, np.ndarray) and np.shares_memory(y, a)
    with pytest.raises(TypeError, match="q: cannot take Tensor through DLPack.*grad"):
        rt.as_array(torch.ones(2, requires_grad=True), "q")
    with pytest.raises(TypeError, match="k: expected an array .* got list"):
        rt.as_array([1.0, 2.0], "k")

    class OtherDevice:
        def __dlpack__(self, stream=None):
            raise AssertionError("not reached")

        def __dlpack_device__(self):
            return (14, 0)
    with pytest.raises(TypeError, match="v: OtherDevice lives on DLPack device type 14"):
        rt.as_array(OtherDevice(), "v")
    with pytest.raises(TypeError, match="q: cannot take Tensor through DLPack"):
        rt.as_array(torch.ones(2, dtype=torch.bfloat16), "q")  # NumPy has no bfloat16
    q, k, v = inputs(1, 6, 6, 2, 2, 4)
    out, _ = ringattn.attention_forward(*(rt.as_array(z.detach()) for z in (q, k, v)), causal=True)
    assert rel(torch.from_numpy(out), sdpa(q, k, v, causal=True)) < 1e-12


def test_as_array_cuda_dlpack_goes_to_the_cuda_backend(monkeypatch):
    class CudaExport:
        def __dlpack__(self, stream=None):
            raise AssertionError("the backend's from_dlpack takes it")

        def __dlpack_device__(self):
            return (2, 0)
    taken = []
    xp = types.SimpleNamespace(from_dlpack=lambda x: taken.append(x) or "device array")
    monkeypatch.setattr(backends.cuda, "array_module", lambda: xp)
    obj = CudaExport()
    assert rt.as_array(obj, "q") == "device array" and taken == [obj]


# ---- sharding helpers (one rank here; several under mpiexec below) ---------------------------------------
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_shard_positions_unshard_single_rank(layout):
    from mpi4py import MPI
    ring = ringattn.Ring(MPI.COMM_SELF, layout=layout)
    x = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    pos = rt.positions(ring, 11)
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.from_numpy(ring.positions(11)))
    s = rt.shard(x, ring)
    assert np.array_equal(s.detach().numpy(), ring.shard(x.detach().numpy()))
    full = rt.unshard(s, ring)
    assert torch.equal(full, x)
    full.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    bf = torch.randn(2, 11, 3).to(torch.bfloat16)
    assert torch.equal(rt.unshard(rt.shard(bf, ring), ring), bf)  # any dtype: bytes are gathered


def test_allreduce_grads_single_rank():
    from mpi4py import MPI
    w = torch.nn.Linear(3, 2)
    w.weight.grad = torch.full_like(w.weight, 2.0)  # bias has no gradient: becomes zeros
    rt.allreduce_grads(w.parameters(), MPI.COMM_SELF)
    assert torch.equal(w.weight.grad, torch.full_like(w.weight, 2.0)) and torch.equal(w.bias.grad, torch.zeros(2))
    half = torch.nn.Linear(3, 2).to(torch.bfloat16)  # 16-bit gradients: summed in float32, same dtype back
    half.weight.grad = torch.full_like(half.weight, 0.375)
    rt.allreduce_grads(half.parameters(), ringattn.Ring(MPI.COMM_SELF))  # a Ring: its communicator
    assert half.weight.grad.dtype == torch.bfloat16
    assert torch.equal(half.weight.grad, torch.full_like(half.weight, 0.375))


# ---- under mpiexec -------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_ring_attention_under_mpiexec(ranks):
    """Every layout, causal and not, GQA, uneven length: out and grads against one-process SDPA (float64
    < 1e-10, float32 < 1e-5), and gradcheck of shard -> ring_attention -> unshard."""
    res = run_file(ranks, "torch_ring_check.py", timeout=240)
    assert res.stdout.count("ok rank") == ranks, res.stdout + res.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("ranks, sp", [(1, 1), (2, 2), (4, 2)], ids=["P1", "sequence-P2", "data2-sequence2-P4"])
def test_training_steps_under_mpiexec(ranks, sp):
    """A tiny model with ring_attention, gradients summed by allreduce_grads over the world, Adam, 20
    steps: the same loss every step and the same parameters as the one-process model with SDPA
    (float64, < 1e-9), so the curves at P = 1, 2 and 4 agree with each other too; at P=4 two rings of
    two ranks train on different batch rows (data + sequence parallel)."""
    res = run_file(ranks, "torch_train_step.py", args=["--steps", 20, "--sp", sp], timeout=240)
    assert res.stdout.count("ok rank") == ranks, res.stdout + res.stderr


EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "torch_sequence_parallel.py")


def test_docs_example_is_the_example_file():
    with open(EXAMPLE) as f:
        code = f.read()
    with open(os.path.join(os.path.dirname(EXAMPLE), "..", "docs", "torch.md")) as f:
        doc = f.read()
    assert "```python\n" + code + "```" in doc, "docs/torch.md must show examples/torch_sequence_parallel.py verbatim"


@pytest.mark.mpi
def test_docs_example_runs_under_mpiexec():
    res = run_file(2, os.path.abspath(EXAMPLE), timeout=240)
    losses = [float(line.split()[-1]) for line in res.stdout.splitlines() if line.startswith("step ")]
    assert len(losses) == 5 and losses[-1] < losses[0], res.stdout
