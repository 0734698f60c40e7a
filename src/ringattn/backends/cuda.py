"""The CUDA backend: CuPy arrays, the CUDA kernels (ringattn.cuda over ringattn._cuda), device
message buffers (transport_cuda.DeviceTransport: CUDA-aware MPI or pinned staging).

Same public names as backends.cpu (the contract is in backends/__init__.py). The kernel calls are
ringattn.cuda's, delegated, so there is one implementation.

Which modules back it: CuPy (imported on first use; a clear RuntimeError without it) and the compiled
ringattn._cuda. Tests replace both with an emulated device ONLY by calling use_emulation(xp, module)
explicitly (tests/emu_device.py install()); nothing in the environment selects it, so a production
run can never land on host memory pretending to be a GPU. use_real() undoes it.

Dtypes: float16, bfloat16 (ml_dtypes', as CuPy's) and float32; the LSE and every accumulator are
float32 (the kernels compute in float32 and write float32 `out` / dq / dk / dv when given them).
"""
import numpy as np

from .. import device
from ..transport_cuda import DeviceTransport
from . import xp_fused
from .dtypes import checked, numpy_dtype

__all__ = ["name", "xp", "supported_dtypes", "is_mine", "check_dtype", "lse_dtype", "acc_dtype",
           "empty", "zeros", "asarray", "to_host", "ascontiguous", "last_axis_contiguous", "scatter_add",
           "forward", "delta", "backward", "ffn_forward", "ffn_backward", "make_transport",
           "layernorm_forward", "add_layernorm_forward", "layernorm_backward", "rope", "softmax_xent",
           "sum_squares", "adamw_update", "linear_forward", "linear_backward", "embedding_backward"]

name = "cuda"
supported_dtypes = ("float16", "bfloat16", "float32")


class _State:
    """What backs the backend now; None = not loaded yet (CuPy / ringattn._cuda on first use)."""
    xp = None
    module = None
    emulated = False


_state = _State()


def __getattr__(attr):
    # `xp` is resolved on access (PEP 562) so that importing the backend never imports CuPy.
    if attr == "xp":
        return array_module()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def __dir__():
    return sorted(set(globals()) | {"xp"})


def array_module():
    """CuPy, or the emulated device's module after use_emulation()."""
    if _state.xp is None:
        try:
            import cupy  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            raise RuntimeError(f"ringattn: CuPy is required for device arrays ({e}); "
                               "pip install cupy-cuda13x") from None
        _state.xp = cupy
    return _state.xp


def module():
    """The compiled kernels: ringattn._cuda, or the emulated build after use_emulation()."""
    if _state.module is None:
        try:
            from .. import _cuda  # noqa: PLC0415 - absent in builds without nvcc
        except ImportError as e:
            raise RuntimeError(f"ringattn was built without its CUDA module ({e}); rebuild with nvcc on PATH") from None
        _state.module = _cuda
    return _state.module


def is_emulated():
    return _state.emulated


def _layer():
    """ringattn.cuda, the Python layer over the compiled kernels (validation, streams, allocation); it
    asks module() / array_module() for what backs it, so the emulation needs no patching there."""
    from .. import cuda as layer  # noqa: PLC0415 - imports ringattn.backends.cuda itself

    return layer


def _ffn():
    from .. import cuda_ffn  # noqa: PLC0415 - the FFN's products in cuBLAS (cuda/ffn.cu stays the reference)

    return cuda_ffn


def use_emulation(xp_module, cuda_module):
    """Back the CUDA backend with an emulated device (tests only): `xp_module` stands in for CuPy,
    `cuda_module` for ringattn._cuda (the kernels built with -DRA_EMULATE)."""
    _state.xp, _state.module, _state.emulated = xp_module, cuda_module, True


def use_real():
    """Back the CUDA backend with CuPy and ringattn._cuda again (loaded on next use)."""
    _state.xp = _state.module = None
    _state.emulated = False


# ---- dtypes --------------------------------------------------------------------------------------
def is_mine(a):
    """A device array: anything exposing __cuda_array_interface__ (CuPy, Numba, torch.cuda ...)."""
    return hasattr(a, "__cuda_array_interface__")


def check_dtype(dtype):
    """The NumPy dtype (bfloat16 from ml_dtypes), or a TypeError when the CUDA kernels do not take it."""
    return numpy_dtype(checked(dtype, supported_dtypes, "GPU"))


def lse_dtype(dtype):
    """The LSE / delta dtype: float32 for every input dtype on the GPU."""
    return np.dtype(np.float32)


def acc_dtype(dtype):
    """Accumulator dtype for `out` and dK/dV: float32 for every supported input (16-bit included)."""
    check_dtype(dtype)
    return np.dtype(np.float32)


# ---- allocation ----------------------------------------------------------------------------------
def empty(shape, dtype):
    return array_module().empty(shape, dtype=numpy_dtype(dtype))


def zeros(shape, dtype):
    return array_module().zeros(shape, dtype=numpy_dtype(dtype))


def asarray(a, dtype=None):
    """A device array (host data is copied to the device; no copy for a device array of `dtype`)."""
    return array_module().asarray(a, dtype=None if dtype is None else numpy_dtype(dtype))


def to_host(a):
    """A host NumPy copy (CuPy's asnumpy: waits for the current stream)."""
    return array_module().asnumpy(a)


def ascontiguous(a):
    return array_module().ascontiguousarray(a)


def last_axis_contiguous(a):
    """`a` itself when its last axis is contiguous, else a contiguous copy (the one copy rule, as on
    the CPU); strides are read from __cuda_array_interface__, so any device array works."""
    st = device.describe(a).strides
    return a if a.shape[-1] <= 1 or st[-1] == getattr(a.dtype, "itemsize", 0) else array_module().ascontiguousarray(a)


def scatter_add(dst, idx, src):
    """dst[idx] += src with repeated indices accumulated (cupyx.scatter_add)."""
    if _state.emulated:
        cupyx = _state.xp.cupyx
    else:
        import cupyx  # noqa: PLC0415 - ships with CuPy
    cupyx.scatter_add(dst, idx, src)


# ---- kernels (ringattn.cuda; signatures as ringattn.kernels) ---------------------------------------
def forward(q, k, v, out, lse, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None, accumulate=False,
            window=(-1, -1)):
    """Attention of q against (k, v) into (out, lse), or merged into them; `out` may be float32."""
    return _layer().forward(q, k, v, out, lse, q_pos, k_pos, causal, scale, accumulate, window)


def delta(dout, out, into=None):
    """rowsum(dout * out) per (batch, head, query), float32."""
    return _layer().delta(dout, out, into)


def backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None,
             window=(-1, -1)):
    """Accumulate (+=) one block pair's gradients into float32 (or input-dtype) dq, dk, dv."""
    return _layer().backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos, k_pos, causal, scale, window)


def ffn_forward(x, w1, b1, w2, b2, chunk=256, out=None):
    return _ffn().ffn_forward(x, w1, b1, w2, b2, chunk, out)


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256, dx=None, accumulate=True):
    if not accumulate:  # cuda_ffn adds into the gradients: overwriting is adding into zeros
        for g in (dw1, db1, dw2, db2):
            g[...] = 0
    return _ffn().ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk, dx)


# ---- fused step operations (issue 16): CuPy expressions, backends/xp_fused.py (docs: backends.cpu) --
def layernorm_forward(x, g, b, eps, out=None):
    return xp_fused.layernorm_forward(array_module(), x, g, b, eps, out)


def add_layernorm_forward(h, a, g, b, eps, out=None):
    return xp_fused.add_layernorm_forward(array_module(), h, a, g, b, eps, out)


def layernorm_backward(dy, x, g, mean, rstd, dg, db, dx=None, residual=None):
    return xp_fused.layernorm_backward(array_module(), dy, x, g, mean, rstd, dg, db, dx, residual)


def rope(qkv, cos, sin, heads, kv_heads, head_dim, inverse=False):
    return xp_fused.rope(array_module(), qkv, cos, sin, heads, kv_heads, head_dim, inverse)


def softmax_xent(logits, labels, scale, out=None):
    return xp_fused.softmax_xent(array_module(), logits, labels, scale, out)


def sum_squares(a):
    return xp_fused.sum_squares(array_module(), a)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    return xp_fused.adamw_update(array_module(), p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale)


def linear_forward(x, w, b, out=None):
    return xp_fused.linear_forward(array_module(), x, w, b, out)


def linear_backward(dy, x, w, dw, db, dx=None, need_dx=True):
    return xp_fused.linear_backward(array_module(), dy, x, w, dw, db, dx, need_dx)


def embedding_backward(ids, dy, dw):
    return xp_fused.embedding_backward(array_module(), ids, dy, dw, scatter_add)


# ---- transport -----------------------------------------------------------------------------------
def make_transport(comm, src, dst, progress=None, cuda_aware=None):
    """The ring transport for device buffers, over this backend's array module (CuPy, or the emulated
    device); cuda_aware=None asks info.mpi_cuda_aware() (MPIX_Query_cuda_support, or RINGATTN_CUDA_AWARE_MPI)."""
    return DeviceTransport(comm, src, dst, cuda_aware=cuda_aware, progress=progress, xp=array_module())
