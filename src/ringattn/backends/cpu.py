"""The CPU backend: NumPy arrays, the C++ kernels (ringattn.kernels), host message buffers.

Same public names as backends.cuda (see backends/__init__.py for the contract); the kernels are
ringattn.kernels' functions themselves, re-exported, so there is one implementation.
"""
import numpy as np

from .. import kernels
from ..kernels import backward, delta, ffn_backward, ffn_forward, forward  # noqa: F401 - the contract
from ..kernels import (add_layernorm_forward, adamw_update, embedding_backward, layernorm_backward,  # noqa: F401
                       layernorm_forward, linear_backward, linear_forward, rope, softmax_xent, sum_squares)
from ..transport import HostTransport
from .dtypes import checked

__all__ = ["name", "xp", "supported_dtypes", "is_mine", "check_dtype", "lse_dtype", "acc_dtype",
           "empty", "zeros", "asarray", "to_host", "ascontiguous", "last_axis_contiguous", "scatter_add",
           "forward", "delta", "backward", "ffn_forward", "ffn_backward", "make_transport",
           "layernorm_forward", "add_layernorm_forward", "layernorm_backward", "rope", "softmax_xent",
           "sum_squares", "adamw_update", "linear_forward", "linear_backward", "embedding_backward"]

name = "cpu"
xp = np
supported_dtypes = ("float32", "float64")


def is_mine(a):
    """A host array: NumPy, and not something exposing device memory."""
    return isinstance(a, np.ndarray) and not hasattr(a, "__cuda_array_interface__")


def check_dtype(dtype):
    """The NumPy dtype, or a TypeError when the C++ kernels do not take it."""
    return np.dtype(checked(dtype, supported_dtypes, "CPU"))


def lse_dtype(dtype):
    """The LSE / delta dtype for an input dtype (float64 inputs keep float64)."""
    return kernels.lse_dtype(dtype)


def acc_dtype(dtype):
    """Accumulator dtype for `out` and dK/dV: the input dtype itself (only float32/float64 run here)."""
    return check_dtype(dtype)


def empty(shape, dtype):
    return np.empty(shape, dtype=dtype)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)


def asarray(a, dtype=None):
    """A NumPy array (no copy when `a` already is one of `dtype`)."""
    return np.asarray(a, dtype=dtype)


def to_host(a):
    """A host NumPy copy (a copy on both backends, so callers may keep or modify it)."""
    return np.array(a, copy=True)


def ascontiguous(a):
    return np.ascontiguousarray(a)


def last_axis_contiguous(a):
    """`a` itself when its last axis is contiguous, else a contiguous copy (the one copy rule: the
    kernels take any other strides)."""
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def scatter_add(dst, idx, src):
    """dst[idx] += src with repeated indices accumulated."""
    np.add.at(dst, idx, src)


def make_transport(comm, src, dst, progress=None):
    """The ring transport for host buffers."""
    return HostTransport(comm, src, dst, progress=progress)

