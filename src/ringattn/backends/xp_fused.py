"""The step's fused operations as array-module (xp: NumPy or CuPy) expressions.

These are the CUDA backend's implementation (CuPy) and the readable reference of the CPU backend's
C++ kernels (cpp/layernorm.cpp, rope.cpp, xent.cpp, adamw.cpp, linear.cpp, embedding.cpp compute
exactly this).
Every function takes the array module first; backends.cpu / backends.cuda bind it and expose the
names of /work/notes/fused_api.md (docstrings there: backends.cpu). The arithmetic is that of
layers.LayerNorm / layers.Rope / the loss heads / optim.adamw_update before issue 16.
"""
import numpy as np


def _host(xp, a):
    """A host NumPy value of `a` (CuPy's asnumpy; NumPy arrays as they are)."""
    return xp.asnumpy(a) if hasattr(xp, "asnumpy") else np.asarray(a)


# ---- LayerNorm -----------------------------------------------------------------------------------
def layernorm_forward(xp, x, g, b, eps, out=None):
    """y = (x - mean) * rstd * g + b per row of x (n, w); returns (y, mean, rstd), mean/rstd (n,)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)
    y = xp.empty(x.shape, dtype=x.dtype) if out is None else out
    y[...] = xc * rstd * g + b
    return y, mu.reshape(-1), rstd.reshape(-1)


def add_layernorm_forward(xp, h, a, g, b, eps, out=None):
    """h += a in place (the residual add), then layernorm_forward(h)."""
    h += a
    return layernorm_forward(xp, h, g, b, eps, out)


def layernorm_backward(xp, dy, x, g, mean, rstd, dg, db, dx=None, residual=None):
    """dx of LayerNorm (into dx, or added into `residual` and residual returned); dg, db overwritten."""
    if residual is not None and dx is not None:
        raise ValueError("layernorm_backward: give dx or residual, not both")
    rs = rstd.reshape(-1, 1)
    xhat = (x - mean.reshape(-1, 1)) * rs
    dxhat = dy * g
    # d/dx of normalisation: remove the mean and the component along xhat, then scale.
    d = rs * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    dg[...] = (dy * xhat).sum(axis=0)
    db[...] = dy.sum(axis=0)
    if residual is not None:
        residual += d
        return residual
    if dx is None:
        return d
    dx[...] = d
    return dx


# ---- Linear --------------------------------------------------------------------------------------
def linear_forward(xp, x, w, b, out=None):
    """y = x @ w + b; x (n, in), w (in, out), b (out,)."""
    y = xp.empty((x.shape[0], w.shape[-1]), dtype=x.dtype) if out is None else out
    xp.matmul(x, w, out=y)
    y += b
    return y


def linear_backward(xp, dy, x, w, dw, db, dx=None, need_dx=True):
    """dx = dy @ w.T (None when not need_dx); dw = x.T @ dy, db = dy.sum(0) overwritten."""
    xp.matmul(x.T, dy, out=dw)
    db[...] = dy.sum(axis=0)
    if not need_dx:
        return None
    if dx is None:
        return dy @ w.T
    xp.matmul(dy, w.T, out=dx)
    return dx


# ---- embedding gradient --------------------------------------------------------------------------
def embedding_backward(xp, ids, dy, dw, scatter_add):
    """dw (vocab, width) overwritten with dw[v] = sum of the rows dy[t] whose ids[t] == v (zero rows
    for unseen ids); scatter_add(dst, idx, src) is the backend's dst[idx] += src (np.add.at,
    cupyx.scatter_add). ids are not range-checked here (layers.Embedding.forward checks them)."""
    dw[...] = 0
    scatter_add(dw, ids, dy)
    return dw


# ---- RoPE ----------------------------------------------------------------------------------------
def rope(xp, qkv, cos, sin, heads, kv_heads, head_dim, inverse=False):
    """Rotate the q and k planes of qkv (b, s, (heads + 2*kv_heads)*head_dim) in place; v untouched.

    Pair i of a head is (x[i], x[i + d/2]) rotated by the angle whose (cos, sin) are cos[s, i],
    sin[s, i]; inverse=True rotates by the opposite angle (the backward: the transpose).
    """
    b, s, _ = qkv.shape
    half = head_dim // 2
    planes = qkv.reshape(b, s, heads + 2 * kv_heads, head_dim)[:, :, : heads + kv_heads]
    x1, x2 = planes[..., :half], planes[..., half:]
    c, sn = cos.reshape(s, 1, half), sin.reshape(s, 1, half)
    if inverse:
        sn = -sn
    y1 = x1 * c - x2 * sn
    x2[...] = x1 * sn + x2 * c
    x1[...] = y1
    return qkv


# ---- softmax cross-entropy -----------------------------------------------------------------------
def softmax_xent(xp, logits, labels, scale, out=None):
    """(loss_sum, correct, dlogits) of logits (n, c) against int labels (n,) in [0, c).

    loss_sum = -sum_i log softmax(logits_i)[label_i] (a float), correct = number of rows whose
    argmax is the label, dlogits = (softmax - onehot) * scale in logits' dtype (into `out` if given).
    The two sums come to the host in one transfer.
    """
    n = logits.shape[0]
    if n == 0:
        d = xp.empty(logits.shape, dtype=logits.dtype) if out is None else out
        return 0.0, 0, d
    m = logits.max(axis=-1, keepdims=True)
    zs = logits - m
    logp = zs - xp.log(xp.exp(zs).sum(axis=-1, keepdims=True))
    rows = xp.arange(n)
    picked = logp[rows, labels]
    stats = xp.stack([-picked.sum(), (logits.argmax(axis=-1) == labels).sum().astype(picked.dtype)])
    d = xp.empty(logits.shape, dtype=logits.dtype) if out is None else out
    d[...] = xp.exp(logp)
    d[rows, labels] -= 1.0
    d *= scale
    host = _host(xp, stats)
    return float(host[0]), int(round(float(host[1]))), d


# ---- optimizer -----------------------------------------------------------------------------------
def sum_squares(xp, a):
    """sum(a * a) accumulated in float64, as a Python float."""
    a64 = a.astype(np.float64)
    s = (a64 * a64).sum()
    return float(_host(xp, s))


def adamw_update(xp, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step in place on p, m, v (1-D, one dtype); g (not modified) is scaled by grad_scale."""
    if grad_scale != 1.0:
        g = g * g.dtype.type(grad_scale)
    c1 = 1.0 - beta1 ** step  # bias corrections
    c2 = 1.0 - beta2 ** step
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    if weight_decay:
        p *= p.dtype.type(1.0 - lr * weight_decay)
    p -= (lr / c1) * m / (xp.sqrt(v / c2) + eps)
    return p
