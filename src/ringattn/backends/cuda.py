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
import sys

import numpy as np

from ..transport_cuda import DeviceTransport
from .dtypes import checked, numpy_dtype

__all__ = ["name", "xp", "supported_dtypes", "is_mine", "check_dtype", "lse_dtype", "acc_dtype",
           "empty", "zeros", "asarray", "to_host", "ascontiguous", "scatter_add",
           "forward", "delta", "backward", "ffn_forward", "ffn_backward", "make_transport"]

name = "cuda"
supported_dtypes = ("float16", "bfloat16", "float32")


class _State:
    """What backs the backend now; None = not loaded yet (CuPy / ringattn._cuda on first use)."""
    xp = None
    module = None
    emulated = False
    saved = None  # ringattn.cuda's (_cuda, _backend) before use_emulation, restored by use_real


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


class _XpArrays:
    """ringattn.cuda's array-backend interface (empty/zeros/current_stream/contiguous) over an xp module."""

    def __init__(self, xp):
        self.xp = xp

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def current_stream(self):
        return self.xp.cuda.get_current_stream().ptr

    def contiguous(self, a):
        return self.xp.ascontiguousarray(a)


def _import_layer():
    """ringattn.cuda; in an emulated session it may import over the emulated module when the
    package was built without ringattn._cuda (CPU-only CI), without leaving that module behind."""
    try:
        from .. import cuda as layer  # noqa: PLC0415
        return layer
    except ImportError:
        if not _state.emulated:
            raise
    missing = object()
    before = sys.modules.get("ringattn._cuda", missing)
    sys.modules["ringattn._cuda"] = _state.module
    try:
        from .. import cuda as layer  # noqa: PLC0415
        return layer
    finally:
        if before is missing:
            del sys.modules["ringattn._cuda"]
        else:
            sys.modules["ringattn._cuda"] = before


def _layer():
    """ringattn.cuda, the Python layer over the compiled kernels (validation, streams, allocation)."""
    try:
        return _import_layer()
    except ImportError as e:
        raise RuntimeError(f"ringattn: CUDA support not built/available ({e})") from None


def use_emulation(xp_module, cuda_module):
    """Back the CUDA backend with an emulated device (tests only): `xp_module` stands in for CuPy,
    `cuda_module` for ringattn._cuda (the kernels built with -DRA_EMULATE)."""
    use_real()
    _state.xp, _state.module, _state.emulated = xp_module, cuda_module, True
    layer = _import_layer()
    _state.saved = (layer._cuda, layer._backend)
    layer._cuda = cuda_module
    layer.set_array_backend(_XpArrays(xp_module))


def use_real():
    """Back the CUDA backend with CuPy and ringattn._cuda again (loaded on next use)."""
    if _state.saved is not None:
        layer = _import_layer()
        layer._cuda, layer._backend = _state.saved
    _state.xp = _state.module = _state.saved = None
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


def scatter_add(dst, idx, src):
    """dst[idx] += src with repeated indices accumulated (cupyx.scatter_add)."""
    if _state.emulated:
        cupyx = _state.xp.cupyx
    else:
        import cupyx  # noqa: PLC0415 - ships with CuPy
    cupyx.scatter_add(dst, idx, src)


# ---- kernels (ringattn.cuda; signatures as ringattn.kernels) ---------------------------------------
def forward(q, k, v, out, lse, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None, accumulate=False):
    """Attention of q against (k, v) into (out, lse), or merged into them; `out` may be float32."""
    return _layer().forward(q, k, v, out, lse, q_pos, k_pos, causal, scale, accumulate)


def delta(dout, out, into=None):
    """rowsum(dout * out) per (batch, head, query), float32."""
    return _layer().delta(dout, out, into)


def backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None):
    """Accumulate (+=) one block pair's gradients into float32 (or input-dtype) dq, dk, dv."""
    return _layer().backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos, k_pos, causal, scale)


def ffn_forward(x, w1, b1, w2, b2, chunk=256, out=None):
    return _layer().ffn_forward(x, w1, b1, w2, b2, chunk, out)


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256):
    return _layer().ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk)


# ---- transport -----------------------------------------------------------------------------------
class _DeviceTransport(DeviceTransport):
    """DeviceTransport over this backend's array module (CuPy, or the emulated device), not a
    CuPy import of its own."""

    def _array_module(self):
        return array_module()


def make_transport(comm, src, dst, progress=None, cuda_aware=None):
    """The ring transport for device buffers; cuda_aware=None asks info.mpi_cuda_aware()
    (MPIX_Query_cuda_support, or RINGATTN_CUDA_AWARE_MPI)."""
    return _DeviceTransport(comm, src, dst, cuda_aware=cuda_aware, progress=progress)
