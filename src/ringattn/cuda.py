"""CUDA kernels on device arrays: CuPy in, CuPy out, on CuPy's current stream.

Two layers, mirroring ringattn.kernels (the CPU side) so the ring and the model can use either:
  - block-level calls that write into caller-provided arrays, with global positions for the mask:
        forward(q, k, v, out, lse, q_pos, k_pos, causal, scale, accumulate)
        delta(dout, out, into=None);  backward(dout, q, k, v, lse, delta, dq, dk, dv, ...)
        ffn_forward(x, w1, b1, w2, b2, chunk, out=None);  ffn_backward(...)
    They take any object with __cuda_array_interface__ (v0-v3).
  - attention_forward / attention_backward as in ringattn.api, allocating outputs with CuPy.

dtypes: float16, bfloat16 (CuPy with ml_dtypes) and float32; all arithmetic, lse and delta are
float32. Differences from the CPU kernels, because of 16-bit inputs: `out` may be float32 (a float32
running accumulator for the ring); backward accumulates into float32 dq, dk, dv (the public
attention_backward casts them back to the input dtype).

Streams: kernels run on CuPy's current stream. An input whose interface (v3) names another stream
is waited for with an event (no host synchronisation).

Which modules back it: ringattn.backends.cuda decides (module() for the compiled kernels, array_module()
for allocation and streams: ringattn._cuda and CuPy, or the test-only emulated device). Importing this
module needs neither; the first call that does raises a clear RuntimeError when one is missing.
"""
import math

import numpy as np

from . import device
from .backends import cuda as _backend

SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


def _mod():
    return _backend.module()


def _xp():
    return _backend.array_module()


def _empty(shape, dtype):
    return _xp().empty(shape, dtype=dtype)


def _zeros(shape, dtype):
    return _xp().zeros(shape, dtype=dtype)


def current_stream():
    """CuPy's current stream handle; the legacy default stream (0) when CuPy is not installed."""
    try:
        return _xp().cuda.get_current_stream().ptr
    except RuntimeError:
        return 0


def require_device():
    """Raise a clear RuntimeError when no GPU (or no driver) is visible."""
    if _mod().device_count() == 0:
        raise RuntimeError(f"no CUDA device available: {_mod().device_error()} (pass NumPy arrays for the CPU kernels)")


def _prepare(named, stream):
    """Parse the interfaces of {name: array}, make `stream` wait for their producers; descriptors."""
    descs = {name: device.describe(a, name) for name, a in named.items()}
    producers = device.producer_streams(descs.values(), stream)
    if producers:
        require_device()
        for s in producers:
            _mod().stream_wait(stream, s)
    return descs


def _b(descs, *names):
    return [descs[n].binding() for n in names]


def _scale(dim, scale):
    return 1.0 / math.sqrt(dim) if scale is None else float(scale)


# ---- block-level calls (the ring's building blocks) --------------------------------------------------
def lse_dtype(dtype):
    """The LSE / delta dtype for any input dtype: always float32 on the GPU (ringattn.kernels has the CPU rule)."""
    return np.float32


def forward(q, k, v, out, lse, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None, accumulate=False,
            window=(-1, -1)):
    """Attention of q against (k, v) written into (out, lse), or merged into them (accumulate).

    out: q's dtype or float32; lse: float32 (batch, heads, seq_q). Positions as in ringattn.kernels.
    """
    s = current_stream()
    d = _prepare(dict(q=q, k=k, v=v, out=out, lse=lse), s)
    _mod().attention_forward(*_b(d, "q", "k", "v", "out", "lse"), int(q_pos[0]), int(q_pos[1]), int(k_pos[0]),
                            int(k_pos[1]), bool(causal), _scale(q.shape[-1], scale), bool(accumulate), s,
                            window_left=int(window[0]), window_right=int(window[1]))
    return out, lse


def delta(dout, out, into=None):
    """rowsum(dout * out) per (batch, head, query), float32 (batch, heads, seq_q)."""
    b, sq, h, _ = out.shape
    if into is None:
        require_device()
        into = _empty((b, h, sq), np.float32)
    s = current_stream()
    d = _prepare(dict(dout=dout, out=out, delta=into), s)
    _mod().attention_delta(*_b(d, "dout", "out", "delta"), s)
    return into


def backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None,
             window=(-1, -1)):
    """Accumulate (+=) the gradients of one (Q block, K/V block) pair into float32 dq, dk, dv."""
    s = current_stream()
    d = _prepare(dict(dout=dout, q=q, k=k, v=v, lse=lse, delta=delta, dq=dq, dk=dk, dv=dv), s)
    _mod().attention_backward(*_b(d, "dout", "q", "k", "v", "lse", "delta", "dq", "dk", "dv"), int(q_pos[0]),
                             int(q_pos[1]), int(k_pos[0]), int(k_pos[1]), bool(causal), _scale(q.shape[-1], scale), s,
                             window_left=int(window[0]), window_right=int(window[1]))
    return dq, dk, dv


def _workspace(tokens, hidden, chunk, copies):
    rows = max(1, min(int(chunk), int(tokens)))
    return _empty((copies * rows * hidden,), np.float32), rows


def ffn_forward(x, w1, b1, w2, b2, chunk=256, out=None):
    """y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens (x: (tokens, width))."""
    require_device()
    y = _empty(x.shape, x.dtype) if out is None else out
    work, rows = _workspace(x.shape[0], w1.shape[-1], chunk, 1)
    s = current_stream()
    d = _prepare(dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, y=y, work=work), s)
    _mod().ffn_forward(*_b(d, "x", "w1", "b1", "w2", "b2", "y", "work"), rows, s)
    return y


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256, dx=None):
    """Returns dx (written into `dx` if given); accumulates (+=) into dw1, db1, dw2, db2 (x's dtype or float32)."""
    require_device()
    dx = _empty(x.shape, x.dtype) if dx is None else dx
    work, rows = _workspace(x.shape[0], w1.shape[-1], chunk, 2)
    s = current_stream()
    d = _prepare(dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, dy=dy, dx=dx, dw1=dw1, db1=db1, dw2=dw2, db2=db2,
                      work=work), s)
    _mod().ffn_backward(*_b(d, "x", "w1", "b1", "w2", "b2", "dy", "dx", "dw1", "db1", "dw2", "db2", "work"), rows, s)
    return dx


# ---- the public single-device API (called by ringattn.attention_forward / attention_backward) -------
def _check_dtype(a, name):
    dname = device.describe(a, name).dtype
    if dname not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: unsupported dtype {dname} on the GPU: use float16, bfloat16 or float32")


def _contig(a):
    return _backend.last_axis_contiguous(a)  # the one copy rule, as on the CPU


def attention_forward(q, k, v, causal=False, softmax_scale=None):
    """(out like q, lse float32 (batch, heads, seq_q)); causal bottom-right aligned."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        _check_dtype(a, name)
    require_device()
    q, k, v = _contig(q), _contig(k), _contig(v)
    b, sq, h, _ = q.shape
    out = _empty(q.shape, q.dtype)
    lse = _empty((b, h, sq), np.float32)
    forward(q, k, v, out, lse, q_pos=(k.shape[1] - sq, 1), k_pos=(0, 1), causal=causal, scale=softmax_scale)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, causal=False, softmax_scale=None):
    """(dq, dk, dv) in the input dtype, accumulated in float32."""
    for name, a in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out)):
        _check_dtype(a, name)
    require_device()
    dout, q, k, v, out = (_contig(a) for a in (dout, q, k, v, out))
    sq = q.shape[1]
    dq = _zeros(q.shape, np.float32)
    dk = _zeros(k.shape, np.float32)
    dv = _zeros(v.shape, np.float32)
    dlt = delta(dout, out)
    backward(dout, q, k, v, lse, dlt, dq, dk, dv, q_pos=(k.shape[1] - sq, 1), k_pos=(0, 1), causal=causal,
             scale=softmax_scale)
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))


def device_count():
    return _mod().device_count()


def archs():
    return list(_mod().archs())
