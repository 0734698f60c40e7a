"""Naive float64 softmax attention: the ground truth every kernel and the ring are tested against.

Materialises the full (seq_q x seq_k) score matrix, so it is for tests and small checks only.
"""
import numpy as np


def positions(n, start=0, stride=1):
    """Global positions of n rows described by (start, stride)."""
    return start + stride * np.arange(n, dtype=np.int64)


def _expand_kv(x, heads):
    return np.repeat(x, heads // x.shape[2], axis=2)


def attention_forward(q, k, v, causal=False, softmax_scale=None, q_pos=None, k_pos=None, window_size=None):
    """out (like q, float64), lse (batch, heads, seq_q) float64.

    Positions are bottom-right aligned (query i at i + seq_k - seq_q, key j at j) unless explicit
    global positions q_pos / k_pos (integer arrays) are given. Causal: key j is visible iff
    k_pos[j] <= q_pos[i]; window_size=(left, right): iff q_pos[i] - left <= k_pos[j] <= q_pos[i] + right
    (-1 = unbounded). Rows that see no key give out = 0 and lse = -inf.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    s = np.einsum("bihd,bjhd->bhij", q, k) * scale
    vis = _visible(sq, sk, causal, q_pos, k_pos, window_size)
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        # IEEE: a row that sees keys gets e / l, so 0/0 = NaN when all its visible scores are -inf
        # (lse = log 0 = -inf); a NaN sum stays NaN. Only a row that sees no key at all is out 0.
        p = np.where(vis.any(axis=-1, keepdims=True), e / l, 0.0)
        lse = m[..., 0] + np.log(l[..., 0])
    out = np.einsum("bhij,bjhd->bihd", p, v)
    return out, lse


def _visible(sq, sk, causal, q_pos, k_pos, window_size=None):
    """(seq_q, seq_k) bool: key j visible to query i, straight from the definition (no shared code
    with the kernels): causal pos_k <= pos_q; window (left, right): pos_q - left <= pos_k <= pos_q +
    right, -1 meaning unbounded."""
    qp = (positions(sq, sk - sq) if q_pos is None else np.asarray(q_pos))[:, None]
    kp = (positions(sk) if k_pos is None else np.asarray(k_pos))[None, :]
    vis = np.ones((sq, sk), bool)
    if causal:
        vis &= kp <= qp
    left, right = (-1, -1) if window_size is None else window_size
    if left >= 0:
        vis &= kp >= qp - left
    if right >= 0:
        vis &= kp <= qp + right
    return vis


def attention_backward(dout, q, k, v, causal=False, softmax_scale=None, q_pos=None, k_pos=None, window_size=None):
    """dq, dk, dv in float64 (dk, dv summed over each GQA group)."""
    dout, q, k, v = (np.asarray(a, dtype=np.float64) for a in (dout, q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(d) if softmax_scale is None else float(softmax_scale)
    out, lse = attention_forward(q, k, v, causal, scale, q_pos, k_pos, window_size)
    ke, ve = _expand_kv(k, h), _expand_kv(v, h)
    s = np.einsum("bihd,bjhd->bhij", q, ke) * scale
    with np.errstate(invalid="ignore", over="ignore"):
        # IEEE for every visible pair (NaN where lse = -inf and the score is -inf); masked pairs are
        # selected to 0, not multiplied.
        vis = _visible(sq, sk, causal, q_pos, k_pos, window_size)
        p = np.where(vis, np.exp(s - lse[..., None]), 0.0)
    dv = np.einsum("bhij,bihd->bjhd", p, dout)
    dp = np.einsum("bihd,bjhd->bhij", dout, ve)
    delta = np.einsum("bihd,bihd->bhi", dout, out)
    with np.errstate(invalid="ignore"):
        ds = np.where(vis, p * (dp - delta[..., None]) * scale, 0.0)
    dq = np.einsum("bhij,bjhd->bihd", ds, ke)
    dk = np.einsum("bhij,bihd->bjhd", ds, q)
    g = h // hkv
    dk = dk.reshape(b, sk, hkv, g, d).sum(axis=3)
    dv = dv.reshape(b, sk, hkv, g, d).sum(axis=3)
    return dq, dk, dv


def merge(out_a, lse_a, out_b, lse_b):
    """Combine two partial attention results over disjoint key sets (float64 reference)."""
    lse = np.logaddexp(lse_a, lse_b)
    t = lambda w: np.moveaxis(w, 1, 2)[..., None]  # (b, h, s) -> (b, s, h, 1)
    with np.errstate(invalid="ignore"):
        # lse = -inf on one side means nothing of weight there yet (out 0, or NaN for keys whose
        # scores were all -inf): that side is dropped (a select: NaN * 0 is NaN) when the other has
        # weight, and when neither has, out_a + out_b keeps a NaN (all visible scores -inf).
        part = lambda o, la: np.where(t(la) == -np.inf, 0.0, o * t(np.exp(la - lse)))  # noqa: E731
        both = part(out_a, lse_a) + part(out_b, lse_b)
        return np.where(t(lse) == -np.inf, out_a + out_b, both), lse


def rel_error(x, ref):
    """||x - ref|| / ||ref|| in float64 (the comparison every test uses)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (den if den > 0 else 1.0))


GELU_C, GELU_A = np.sqrt(2.0 / np.pi), 0.044715  # tanh approximation of GELU, as the kernels use


def ffn(x, w1, b1, w2, b2, dy=None):
    """Naive float64 feed-forward y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over all tokens at once: y,
    and (y, dx, dw1, db1, dw2, db2) when dy is given."""
    x, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2))
    pre = x @ w1 + b1
    t = np.tanh(GELU_C * (pre + GELU_A * pre**3))
    h = 0.5 * pre * (1.0 + t)
    y = h @ w2 + b2
    if dy is None:
        return y
    dy = np.asarray(dy, np.float64)
    dgelu = 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_A * pre**2)
    dpre = (dy @ w2.T) * dgelu
    return y, dpre @ w1.T, x.T @ dpre, dpre.sum(0), h.T @ dy, dy.sum(0)



# ---- the step's other operations (issue 16), float64, written from the definitions ---------------
def layernorm(x, g, b, eps, dy=None):
    """(y, mean, rstd) of LayerNorm over the last axis of x (n, w); with dy also (dx, dg, db)."""
    x, g, b = (np.asarray(a, np.float64) for a in (x, g, b))
    mean = x.mean(axis=-1)
    rstd = 1.0 / np.sqrt(x.var(axis=-1) + eps)
    xhat = (x - mean[:, None]) * rstd[:, None]
    y = xhat * g + b
    if dy is None:
        return y, mean, rstd
    dy = np.asarray(dy, np.float64)
    w = x.shape[-1]
    dxhat = dy * g
    dx = rstd[:, None] / w * (w * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True))
    return y, mean, rstd, dx, (dy * xhat).sum(0), dy.sum(0)


def rope_angles(positions, head_dim, base=10000.0):
    """(cos, sin), each (seq, head_dim/2), of RoPE at the given global positions (float64)."""
    inv = base ** (-np.arange(head_dim // 2, dtype=np.float64) * 2.0 / head_dim)
    ang = np.asarray(positions, np.float64)[:, None] * inv
    return np.cos(ang), np.sin(ang)


def rope(x, cos, sin, inverse=False):
    """Half-split RoPE of x (batch, seq, heads, dim): pair (x[i], x[i + dim/2]) as the complex number
    x[i] + 1j x[i + dim/2] times exp(+-1j angle)."""
    x = np.asarray(x, np.float64)
    h = x.shape[-1] // 2
    rot = (np.asarray(cos, np.float64) + 1j * np.asarray(sin, np.float64) * (-1 if inverse else 1))[None, :, None, :]
    z = (x[..., :h] + 1j * x[..., h:]) * rot
    return np.concatenate([z.real, z.imag], axis=-1)


def softmax_xent(logits, labels, scale):
    """(loss_sum, correct, dlogits) of softmax cross-entropy: -sum log p[label], argmax hits, (p - onehot) * scale."""
    z = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    rows = np.arange(len(labels))
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(z)
    onehot[rows, labels] = 1.0
    return float((lse - z[rows, labels]).sum()), int((z.argmax(-1) == labels).sum()), (p - onehot) * scale


def adamw(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step (decoupled decay, bias-corrected moments) in float64: new (p, m, v)."""
    p, g, m, v = (np.asarray(a, np.float64) for a in (p, g, m, v))
    g = g * grad_scale
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat, vhat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
    return p * (1 - lr * weight_decay) - lr * mhat / (np.sqrt(vhat) + eps), m, v


def embedding_backward(ids, dy, vocab):
    """dw (vocab, width) of an embedding lookup: one-hot(ids)^T @ dy in float64 (rows of unseen ids are 0)."""
    ids = np.asarray(ids).reshape(-1)
    onehot = np.zeros((ids.size, vocab))
    onehot[np.arange(ids.size), ids] = 1.0
    dy = np.asarray(dy, np.float64)
    return onehot.T @ dy.reshape(ids.size, dy.shape[-1])
