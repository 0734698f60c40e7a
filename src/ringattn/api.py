"""Public single-process attention: ringattn.attention_forward / attention_backward.

NumPy arrays run on the C++ kernels, CuPy (or any __cuda_array_interface__) arrays on the CUDA
kernels: ringattn.backends.backend_for decides, and the code below is written once against the
backend contract. Every argument is checked here, once, with a message that names the problem
(Ring uses the same checks).
"""
import math
import numbers

import numpy as np

from . import backends, interop
from .mask import Mask


def check_attention_args(q, k, v, softmax_scale=None, **unsupported):
    """Validate (q, k, v) and the scale; returns the scale to use. Raises ValueError/TypeError."""
    for name, val in unsupported.items():
        if val is not None and not (isinstance(val, (bool, int, float)) and not val):  # arrays: no truth test
            raise NotImplementedError(f"ringattn: {name}={val!r} is not supported")
    arrays = {"q": q, "k": k, "v": v}
    for name, a in arrays.items():
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
        if a.ndim != 4:
            raise ValueError(f"{name}: expected 4 dimensions (batch, seq, heads, dim), got shape {tuple(a.shape)}")
        if 0 in a.shape:
            raise ValueError(f"{name}: empty array, shape {tuple(a.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"mixed dtypes: q {q.dtype}, k {k.dtype}, v {v.dtype}; pass one dtype")
    b, sq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"head dim mismatch: q {d}, k/v {k.shape[3]}")
    if h % k.shape[2]:
        raise ValueError(f"heads ({h}) must be a multiple of heads_kv ({k.shape[2]})")
    if d > 256:
        raise ValueError(f"head dim {d} is not supported (1..256)")
    backends.backend_for(q=q, k=k, v=v).check_dtype(q.dtype)  # a host/device mix, or a dtype it lacks
    return check_scale(softmax_scale, d)


def check_scale(softmax_scale, dim):
    """The softmax scale to use: 1/sqrt(dim) for None, else a finite real number (not a string, not a bool)."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(dim)
    # float("0.5") and float(True) would succeed: accept real numbers only, so a typo is not a scale.
    if isinstance(softmax_scale, (bool, np.bool_)) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a number (int or float), got "
                        f"{type(softmax_scale).__name__} {softmax_scale!r}")
    scale = float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be finite, got {scale}")
    return scale


def lse_dtype_for(q):
    """The lse dtype attention_forward returns for q: the CPU rule (float32, float64 for float64) or the GPU one."""
    return backends.backend_for(q=q).lse_dtype(q.dtype)


def check_backward_args(dout, q, k, v, out, lse, softmax_scale=None):
    """Validate attention_backward's arguments (single process and Ring); returns the scale.

    dout and out: arrays like q (shape, dtype, NumPy or device); lse: (batch, heads, seq_q) in the dtype
    attention_forward returned (lse_dtype_for(q)); a different lse dtype is refused rather than
    converted, since it means lse did not come from the matching forward.
    """
    scale = check_attention_args(q, k, v, softmax_scale)
    for name, a in (("dout", dout), ("out", out), ("lse", lse)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: expected an array, got {type(a).__name__}")
    backends.backend_for(dout=dout, q=q, k=k, v=v, out=out, lse=lse)  # one kind for all six
    if tuple(dout.shape) != tuple(q.shape) or tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if dout.dtype != q.dtype or out.dtype != q.dtype:
        raise TypeError(f"mixed dtypes: dout {dout.dtype}, out {out.dtype}, q {q.dtype}")
    b, sq, h, _ = q.shape
    if tuple(lse.shape) != (b, h, sq):
        raise ValueError(f"lse: shape {tuple(lse.shape)} but expected {(b, h, sq)}")
    want = np.dtype(lse_dtype_for(q))
    if np.dtype(lse.dtype) != want:
        raise TypeError(f"lse: dtype {lse.dtype} but expected {want} for {q.dtype} inputs (the lse that "
                        f"attention_forward returned: float32, float64 for float64 inputs on the CPU)")
    return scale


def attention_forward(q, k, v, causal=False, softmax_scale=None, *, window_size=None, dropout_p=0.0, attn_mask=None):
    """Exact softmax attention. Returns (out like q, lse (batch, heads, seq_q)).

    Positions are bottom-right aligned (flash-attn >= 2.1): query i sits at i + seq_k - seq_q, so causal
    means query i sees keys j <= i + seq_k - seq_q. window_size=(left, right) (flash-attn's convention,
    -1 = unbounded, combinable with causal, which sets right = 0): query i sees keys with
    i + seq_k - seq_q - left <= j <= i + seq_k - seq_q + right.
    lse is float32 (float64 for float64 inputs): natural log of sum_j exp(scale * q.k_j).
    Arrays: NumPy, CuPy, or anything ringattn.interop.as_array takes (torch tensors, __dlpack__ objects).
    """
    q, k, v = (interop.as_array(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
    scale = check_attention_args(q, k, v, softmax_scale, dropout_p=dropout_p, attn_mask=attn_mask)
    mask = Mask.of(causal, window_size)
    be = backends.backend_for(q=q, k=k, v=v)
    q, k, v = (be.last_axis_contiguous(a) for a in (q, k, v))
    b, sq, h, d = q.shape
    out = be.empty(q.shape, q.dtype)
    lse = be.empty((b, h, sq), be.lse_dtype(q.dtype))
    causal_arg, *window = mask.kernel_args()
    be.forward(q, k, v, out, lse, q_pos=(k.shape[1] - sq, 1), k_pos=(0, 1), causal=causal_arg, scale=scale,
               window=window)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None, *, window_size=None):
    """Gradients (dq, dk, dv) of attention_forward, from its (out, lse) (the same causal and
    window_size); accumulated in the backend's accumulator dtype (float32 for 16-bit inputs) and
    returned in the input dtype."""
    dout, q, k, v, out, lse = (interop.as_array(a, n) for a, n in zip(
        (dout, q, k, v, out, lse), ("dout", "q", "k", "v", "out", "lse")))
    scale = check_backward_args(dout, q, k, v, out, lse, softmax_scale)
    mask = Mask.of(causal, window_size)
    be = backends.backend_for(q=q, k=k, v=v)
    dout, q, k, v, out = (be.last_axis_contiguous(a) for a in (dout, q, k, v, out))
    lse = be.ascontiguous(lse)
    sq = q.shape[1]
    acc = be.acc_dtype(q.dtype)
    dq, dk, dv = be.zeros(q.shape, acc), be.zeros(k.shape, acc), be.zeros(v.shape, acc)
    dlt = be.delta(dout, out)
    causal_arg, *window = mask.kernel_args()
    be.backward(dout, q, k, v, lse, dlt, dq, dk, dv, q_pos=(k.shape[1] - sq, 1), k_pos=(0, 1),
                causal=causal_arg, scale=scale, window=window)
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
