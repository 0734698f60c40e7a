"""Block-level kernel calls on NumPy arrays: the layer the ring and the model build on.

Positions: query row i of the block sits at global position q_pos[0] + i * q_pos[1], key row j at
k_pos[0] + j * k_pos[1]; with causal=True key j is visible to query i iff pos_k <= pos_q, and
window=(left, right) limits it to pos_q - left <= pos_k <= pos_q + right (-1: unbounded; causal
sets right = 0). ringattn.mask.Mask describes the same mask (Mask.kernel_args gives these arguments).
Arrays may be strided views (the ring passes slices of its buffers) but their last axis must be
contiguous; the validation and the messages live in the C++ bindings (cpp/bindings.cpp).
"""
import numpy as np

from .threads import passive_wait_by_default

passive_wait_by_default()  # before libgomp loads with _cpu: see threads.py
from . import _cpu  # noqa: E402 - after the OpenMP setting above


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


def ffn_backward(x, w1, b1, w2, b2, dy, dw1, db1, dw2, db2, chunk=256, dx=None, accumulate=True):
    """Returns dx (written into `dx`, a new array when None); adds (+=) into dw1, db1, dw2, db2, or
    overwrites them when not accumulate. Recomputes the hidden activation per chunk."""
    dx = np.empty_like(x) if dx is None else dx
    _cpu.ffn_backward(x, w1, b1, w2, b2, dy, dx, dw1, db1, dw2, db2, int(chunk), bool(accumulate))
    return dx


# ---- the rest of a training step (issue 16): C-contiguous arrays, one dtype per call --------------
# The readable version of each kernel is backends/xp_fused.py (the CUDA backend runs it).
def layernorm_forward(x, g, b, eps, out=None):
    """LayerNorm of each row of x (n, w): (y, mean, rstd); mean, rstd (n,) in x's dtype."""
    y = np.empty_like(x) if out is None else out
    mean, rstd = np.empty(x.shape[:1], x.dtype), np.empty(x.shape[:1], x.dtype)
    _cpu.layernorm_forward(x, g, b, y, mean, rstd, float(eps))
    return y, mean, rstd


def add_layernorm_forward(h, a, g, b, eps, out=None):
    """h += a in place (the residual add), then (y, mean, rstd) = layernorm_forward(h), in one pass."""
    y = np.empty_like(h) if out is None else out
    mean, rstd = np.empty(h.shape[:1], h.dtype), np.empty(h.shape[:1], h.dtype)
    _cpu.layernorm_forward(h, g, b, y, mean, rstd, float(eps), a)
    return y, mean, rstd


def layernorm_backward(dy, x, g, mean, rstd, dg, db, dx=None, residual=None):
    """dx of LayerNorm into dx (a new array when None), or added into `residual` (returned); dg, db
    are overwritten with this call's sums."""
    if residual is not None and dx is not None:
        raise ValueError("layernorm_backward: give dx or residual, not both")
    target = residual if residual is not None else (np.empty_like(x) if dx is None else dx)
    _cpu.layernorm_backward(dy, x, g, mean, rstd, dg, db, target, residual is not None)
    return target


def rope(qkv, cos, sin, heads, kv_heads, head_dim, inverse=False):
    """RoPE in place on the q and k heads of qkv (b, s, (heads + 2*kv_heads)*head_dim); cos, sin (s, head_dim/2)."""
    _cpu.rope(qkv, cos, sin, int(heads), int(kv_heads), int(head_dim), bool(inverse))
    return qkv


def softmax_xent(logits, labels, scale, out=None):
    """(loss_sum, correct, dlogits = (softmax - onehot) * scale) of logits (n, c), int labels (n,) in [0, c)."""
    d = np.empty_like(logits) if out is None else out
    loss, correct = _cpu.softmax_xent(logits, np.asarray(labels), float(scale), d)
    return float(loss), int(correct), d


def sum_squares(a):
    """sum(a * a) accumulated in float64 (the same value for any thread count)."""
    return float(_cpu.sum_squares(a))


def adamw_update(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step in place on p, m, v (1-D; step 1-based); g * grad_scale is the gradient, g unchanged."""
    _cpu.adamw_update(p, g, m, v, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(step),
                      float(grad_scale))
    return p


def linear_forward(x, w, b, out=None):
    """y = x @ w + b on the project's GEMM (cpp/linear.cpp); x (n, in), w (in, out), b (out,)."""
    y = np.empty((x.shape[0], w.shape[-1]), x.dtype) if out is None else out
    _cpu.linear_forward(x, w, b, y)
    return y


def linear_backward(dy, x, w, dw, db, dx=None, need_dx=True):
    """dx = dy @ w.T (into dx, a new array when None; skipped and None returned when not need_dx);
    dw = x.T @ dy, db = dy.sum(0) OVERWRITTEN."""
    if need_dx and dx is None:
        dx = np.empty_like(x)
    _cpu.linear_backward(dy, x, w, dx if need_dx else None, dw, db)
    return dx if need_dx else None


def embedding_backward(ids, dy, dw):
    """dw (vocab, width) OVERWRITTEN: dw[v] = sum of the rows dy[t] (n, width) with ids[t] == v, zero
    rows for ids that never occur; ids (n,) integers in [0, vocab) (checked: a ValueError otherwise)."""
    _cpu.embedding_backward(np.asarray(ids), dy, dw)
    return dw
