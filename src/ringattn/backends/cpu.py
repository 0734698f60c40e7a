"""The CPU backend: NumPy arrays, the C++ kernels (ringattn.kernels), host message buffers.

Same public names as backends.cuda (see backends/__init__.py for the contract); the kernels are
ringattn.kernels' functions themselves, re-exported, so there is one implementation.
"""
import numpy as np

from .. import kernels
from ..kernels import backward, delta, ffn_backward, ffn_forward, forward  # noqa: F401 - the contract
from ..transport import HostTransport
from . import xp_fused
from .dtypes import checked

__all__ = ["name", "xp", "supported_dtypes", "is_mine", "check_dtype", "lse_dtype", "acc_dtype",
           "empty", "zeros", "asarray", "to_host", "ascontiguous", "last_axis_contiguous", "scatter_add",
           "forward", "delta", "backward", "ffn_forward", "ffn_backward", "make_transport",
           "layernorm_forward", "add_layernorm_forward", "layernorm_backward", "rope", "softmax_xent",
           "sum_squares", "adamw_update"]

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


# ---- fused step operations (issue 16; /work/notes/fused_api.md) ----------------------------------
def layernorm_forward(x, g, b, eps, out=None):
    """LayerNorm of each row of x (n, w): (y, mean, rstd), mean and rstd (n,) in x's dtype."""
    return xp_fused.layernorm_forward(np, x, g, b, eps, out)


def add_layernorm_forward(h, a, g, b, eps, out=None):
    """h += a in place (the residual add), then (y, mean, rstd) = layernorm_forward(h)."""
    return xp_fused.add_layernorm_forward(np, h, a, g, b, eps, out)


def layernorm_backward(dy, x, g, mean, rstd, dg, db, dx=None, residual=None):
    """dx (into dx when given); residual given: residual += dx and residual returned. dg, db overwritten."""
    return xp_fused.layernorm_backward(np, dy, x, g, mean, rstd, dg, db, dx, residual)


def rope(qkv, cos, sin, heads, kv_heads, head_dim, inverse=False):
    """RoPE in place on the q and k planes of qkv (b, s, (heads + 2*kv_heads)*head_dim); cos, sin (s, head_dim/2)."""
    return xp_fused.rope(np, qkv, cos, sin, heads, kv_heads, head_dim, inverse)


def softmax_xent(logits, labels, scale, out=None):
    """(loss_sum, correct, dlogits = (softmax - onehot) * scale) of logits (n, c), labels (n,)."""
    return xp_fused.softmax_xent(np, logits, labels, scale, out)


def sum_squares(a):
    """sum(a * a) with float64 accumulation, a Python float."""
    return xp_fused.sum_squares(np, a)


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step in place on p, m, v (step 1-based; g * grad_scale is the gradient; g unchanged)."""
    return xp_fused.adamw_update(np, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale)
