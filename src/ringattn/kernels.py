"""Block-level kernel calls on NumPy arrays: the layer the ring and the model build on.

Positions: query row i of the block sits at global position q_pos[0] + i * q_pos[1], key row j at
k_pos[0] + j * k_pos[1]; with causal=True key j is visible to query i iff pos_k <= pos_q, and
window=(left, right) limits it to pos_q - left <= pos_k <= pos_q + right (-1: unbounded; causal
sets right = 0). ringattn.mask.Mask describes the same mask (Mask.kernel_args gives these arguments).
Arrays may be strided views (the ring passes slices of its buffers) but their last axis must be
contiguous; the validation and the messages live in the C++ bindings (cpp/bindings.cpp).
"""
import numpy as np

from . import _cpu


def lse_dtype(dtype):
    """The LSE / delta dtype that goes with an input dtype: float32, or float64 for float64."""
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


def forward(q, k, v, out, lse, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None, accumulate=False,
            window=(-1, -1)):
    """Attention of q against (k, v), written into (out, lse) or merged into them (accumulate)."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    _cpu.attention_forward(q, k, v, out, lse, int(q_pos[0]), int(q_pos[1]), int(k_pos[0]), int(k_pos[1]),
                           bool(causal), scale, bool(accumulate), int(window[0]), int(window[1]))
    return out, lse


def delta(dout, out, into=None):
    """rowsum(dout * out) per (batch, head, query): the D term of the backward pass."""
    b, s, h, _ = out.shape
    d = np.empty((b, h, s), dtype=lse_dtype(out.dtype)) if into is None else into
    _cpu.attention_delta(dout, out, d)
    return d


def backward(dout, q, k, v, lse, delta, dq, dk, dv, q_pos=(0, 1), k_pos=(0, 1), causal=False, scale=None,
             window=(-1, -1)):
    """Accumulate (+=) the gradients of one (Q block, K/V block) pair into dq, dk, dv."""
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else float(scale)
    _cpu.attention_backward(dout, q, k, v, lse, delta, dq, dk, dv, int(q_pos[0]), int(q_pos[1]),
                            int(k_pos[0]), int(k_pos[1]), bool(causal), scale, int(window[0]), int(window[1]))
    return dq, dk, dv


def ffn_forward(x, w1, b1, w2, b2, chunk=256, out=None):
    """y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens (x: (tokens, width))."""
    y = np.empty_like(x) if out is None else out
    _cpu.ffn_forward(x, w1, b1, w2, b2, y, int(chunk))
    return y


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256):
    """Returns dx; accumulates (+=) into dw1, db1, dw2, db2. Recomputes the hidden activation per chunk."""
    dx = np.empty_like(x)
    _cpu.ffn_backward(x, w1, b1, w2, b2, dy, dx, dw1, db1, dw2, db2, int(chunk))
    return dx
