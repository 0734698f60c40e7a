"""Layers of the Blockwise Transformer, each with an explicit forward and backward (no autograd).

Every layer is a small class holding only static settings; parameters are passed in as a dict of
arrays named locally ('w', 'b', 'g', ...), so the model can keep one flat name -> array dict.

    out, cache = layer.forward(p, x, ...)
    dx, grads  = layer.backward(dout, cache)      # grads: dict with the same keys as p

Backward never changes its inputs; grads are fresh arrays. Shapes: activations are
(batch, seq_local, width); attention heads are (batch, seq_local, heads, head_dim).

Layers here: Linear, LayerNorm, Embedding (token ids), InputProjection (real-valued inputs, a
Linear), Rope (rotary embedding from GLOBAL positions: the ring layout decides them), Attention
(QKV projection, RoPE on q/k, exact attention through an `attn` object, output projection),
FeedForward (blockwise GELU MLP in the backend's kernels, C++ or CUDA; the (tokens x hidden) activation is never
stored: the kernel's backward recomputes it per chunk), and the two loss heads
MeanPoolClassifier ('cls') and TokenClassifier ('lm'), which reduce over the sequence-parallel
group (`comm`, None = single process).

`attn` is anything with the ringattn.Ring methods
    out, lse = attn.attention_forward(q, k, v, causal=..., window_size=...)
    dq, dk, dv = attn.attention_backward(dout, q, k, v, out, lse, causal=..., window_size=...)
a Ring for sequence parallelism, or LocalAttention (below) for one process (window_size is passed
only when the model has a sliding window).

Host or device: ringattn.backends.backend_for decides from the input arrays (NumPy: C++ kernels;
CuPy or the emulated device: CUDA kernels). `xp` is that backend's array module, and only xp.*
calls that NumPy and CuPy both provide are used. Small host values (labels, positions, the sums
reduced over `comm`) are moved to the arrays' side explicitly, never mixed in implicitly.
"""
import numpy as np

from . import api, backends


def array_module(a):
    """The array module of `a`'s backend: numpy, or CuPy (the emulated device's in tests)."""
    return backends.backend_for(a).xp


class LocalAttention:
    """Single-process stand-in for ringattn.Ring: exact attention over the whole (local) sequence."""

    def __init__(self, softmax_scale=None):
        self.softmax_scale = softmax_scale

    def attention_forward(self, q, k, v, causal=False, window_size=None):
        return api.attention_forward(q, k, v, causal=causal, softmax_scale=self.softmax_scale, window_size=window_size)

    def attention_backward(self, dout, q, k, v, out, lse, causal=False, window_size=None):
        return api.attention_backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=self.softmax_scale,
                                      window_size=window_size)


class Linear:
    """y = x @ w + b over the last axis. p: w (in, out), b (out,)."""

    def forward(self, p, x):
        return x @ p["w"] + p["b"], (x, p["w"])

    def backward(self, dy, cache):
        x, w = cache
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        return dy @ w.T, {"w": x2.T @ dy2, "b": dy2.sum(axis=0)}


class InputProjection(Linear):
    """Real-valued inputs (batch, seq, in_features) -> (batch, seq, width): a Linear."""


class LayerNorm:
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis. p: g, b (width,)."""

    def __init__(self, eps=1e-5):
        self.eps = eps

    def forward(self, p, x):
        xp = array_module(x)
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)
        xhat = xc * rstd
        return xhat * p["g"] + p["b"], (xhat, rstd, p["g"])

    def backward(self, dy, cache):
        xhat, rstd, g = cache
        lead = tuple(range(dy.ndim - 1))
        dxhat = dy * g
        # d/dx of normalisation: remove the mean and the component along xhat, then scale.
        dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        return dx, {"g": (dy * xhat).sum(axis=lead), "b": dy.sum(axis=lead)}


class Embedding:
    """Token ids (batch, seq) -> rows of w (vocab, width). dx is None (ids have no gradient)."""

    def forward(self, p, ids):
        w = p["w"]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
            raise ValueError(f"token ids must be in [0, {w.shape[0]}), got range [{int(ids.min())}, {int(ids.max())}]")
        return w[ids], (ids, w.shape)

    def backward(self, dy, cache):
        ids, shape = cache
        be = backends.backend_for(dy)
        dw = be.zeros(shape, dy.dtype)
        be.scatter_add(dw, ids.reshape(-1), dy.reshape(-1, shape[1]))
        return None, {"w": dw}


class Rope:
    """Rotary position embedding on (batch, seq, heads, dim), dim even, half-split pairing.

    Pair i of a head is (x[i], x[i + dim/2]) rotated by angle pos * base**(-2i/dim), where pos is
    the GLOBAL position of the token (under zigzag/striped layouts a rank's tokens are not
    contiguous). Angles are computed in float64 so large positions keep their precision.
    """

    def __init__(self, base=10000.0):
        self.base = float(base)

    def tables(self, positions, dim, dtype, xp=np):
        """(cos, sin), each (seq, 1, dim/2), for the given global positions."""
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {dim}")
        inv = self.base ** (-np.arange(0, dim // 2, dtype=np.float64) * 2.0 / dim)
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
        cos = xp.asarray(np.cos(ang)[:, None, :], dtype=dtype)
        sin = xp.asarray(np.sin(ang)[:, None, :], dtype=dtype)
        return cos, sin

    @staticmethod
    def forward(x, tables):
        cos, sin = tables
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        y = array_module(x).empty(x.shape, dtype=x.dtype)  # contiguous: goes to the kernels as is
        y[..., :h] = x1 * cos - x2 * sin
        y[..., h:] = x1 * sin + x2 * cos
        return y, tables

    @staticmethod
    def backward(dy, tables):
        # The transpose of a rotation is the rotation by the opposite angle.
        cos, sin = tables
        h = dy.shape[-1] // 2
        d1, d2 = dy[..., :h], dy[..., h:]
        dx = array_module(dy).empty(dy.shape, dtype=dy.dtype)
        dx[..., :h] = d1 * cos + d2 * sin
        dx[..., h:] = d2 * cos - d1 * sin
        return dx, {}


class Attention:
    """Multi-head self-attention: x @ wqkv + bqkv -> q, k, v; RoPE on q, k; attn; @ wo + bo.

    p: wqkv (width, (heads + 2*kv_heads) * head_dim), bqkv, wo (heads * head_dim, width), bo.
    kv_heads < heads is grouped-query attention (heads % kv_heads == 0).
    window >= 0: sliding window, each query sees the keys at most `window` positions before it (and
    after it too when not causal), in global positions; -1: no window.
    """

    def __init__(self, heads, head_dim, attn, causal=False, kv_heads=None, window=-1):
        self.heads, self.head_dim, self.attn, self.causal = heads, head_dim, attn, causal
        # keyword arguments of every attn call: window_size only with a window, so any attn object works without
        self.mask_kw = {"causal": causal}
        if window >= 0:
            self.mask_kw["window_size"] = (window, 0 if causal else window)
        self.kv_heads = heads if kv_heads is None else kv_heads
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        self.proj = Linear()

    def forward(self, p, x, rope_tables):
        b, s, _ = x.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        xp = array_module(x)
        qkv, c_qkv = self.proj.forward({"w": p["wqkv"], "b": p["bqkv"]}, x)
        q = qkv[..., : h * d].reshape(b, s, h, d)
        k = qkv[..., h * d : (h + hk) * d].reshape(b, s, hk, d)
        v = xp.ascontiguousarray(qkv[..., (h + hk) * d :].reshape(b, s, hk, d))
        q, _ = Rope.forward(q, rope_tables)
        k, _ = Rope.forward(k, rope_tables)
        o, lse = self.attn.attention_forward(q, k, v, **self.mask_kw)
        y, c_o = self.proj.forward({"w": p["wo"], "b": p["bo"]}, o.reshape(b, s, h * d))
        return y, (c_qkv, q, k, v, o, lse, c_o, rope_tables)

    def backward(self, dy, cache):
        c_qkv, q, k, v, o, lse, c_o, tables = cache
        b, s, h, d = q.shape
        xp = array_module(dy)
        do, g_o = self.proj.backward(dy, c_o)
        do = xp.ascontiguousarray(do.reshape(b, s, h, d))
        dq, dk, dv = self.attn.attention_backward(do, q, k, v, o, lse, **self.mask_kw)
        dq, _ = Rope.backward(dq, tables)
        dk, _ = Rope.backward(dk, tables)
        dqkv = xp.concatenate([dq.reshape(b, s, -1), dk.reshape(b, s, -1), dv.reshape(b, s, -1)], axis=-1)
        dx, g_qkv = self.proj.backward(dqkv, c_qkv)
        return dx, {"wqkv": g_qkv["w"], "bqkv": g_qkv["b"], "wo": g_o["w"], "bo": g_o["b"]}


class FeedForward:
    """Blockwise MLP y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens.

    p: w1 (width, hidden), b1 (hidden,), w2 (hidden, width), b2 (width,); hidden = 4 x width in the
    model. Only x is cached: the hidden activation is recomputed chunk by chunk in the backward
    kernel, so activation memory is O(chunk x hidden), not O(tokens x hidden).
    """

    def __init__(self, chunk=256):
        self.chunk = int(chunk)

    def forward(self, p, x):
        be = backends.backend_for(x)
        x2 = be.ascontiguous(x.reshape(-1, x.shape[-1]))
        y = be.ffn_forward(x2, p["w1"], p["b1"], p["w2"], p["b2"], chunk=self.chunk)
        return y.reshape(x.shape), (x2, p, x.shape)

    def backward(self, dy, cache):
        x2, p, shape = cache
        be = backends.backend_for(dy)
        g = {k: be.xp.zeros_like(p[k]) for k in ("w1", "b1", "w2", "b2")}
        dy2 = be.ascontiguous(dy.reshape(-1, shape[-1]))
        dx = be.ffn_backward(x2, p["w1"], p["b1"], p["w2"], p["b2"], dy2, g["w1"], g["b1"], g["w2"], g["b2"],
                             chunk=self.chunk)
        return dx.reshape(shape), g


# ---- loss heads: reductions over the sequence-parallel group -------------------------------------

def allreduce_sum(comm, a):
    """Sum a small host array over comm (None = single process); returns a float64 NumPy array."""
    buf = np.array(a, dtype=np.float64)  # host copy (tiny: per-batch sums and counts)
    if comm is not None and comm.Get_size() > 1:
        from mpi4py import MPI
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


def _host_labels(labels):
    """Labels as a host array: they are validated and selected on the host, then moved to h's side."""
    return backends.backend_for(labels).to_host(labels)


def _stats_to_host(be, picked, logits, lab):
    """(-sum of the picked log-probabilities, correct predictions), computed where the arrays are and
    brought to the host in ONE transfer (the loss is reduced over the group on the host)."""
    stats = be.to_host(be.xp.stack([-picked.sum(), (logits.argmax(axis=-1) == lab).sum().astype(picked.dtype)]))
    return float(stats[0]), int(stats[1])


def _log_softmax(z):
    xp = array_module(z)
    m = z.max(axis=-1, keepdims=True)
    zs = z - m
    return zs - xp.log(xp.exp(zs).sum(axis=-1, keepdims=True))


class MeanPoolClassifier:
    """'cls' head: mean over ALL tokens of the whole sequence (across the group), Linear, softmax CE.

    forward(p, h, labels (batch,), total_tokens) -> (loss, cache, stats); loss = mean CE over the batch.
    backward(cache) -> (dh, grads). The pooled vector is reduced with an Allreduce of the local sums,
    so it is identical on every rank; hence the classifier's own grads (w, b) are identical on every
    rank too and are returned ONLY on group rank 0 (zeros elsewhere), so that the trainer's sum over
    the group counts them once. dh (this rank's tokens) is a true partial gradient on every rank.
    """

    def __init__(self, comm=None):
        self.comm = comm

    def forward(self, p, h, labels, total_tokens):
        be = backends.backend_for(h)
        xp = be.xp
        b, s, w = h.shape
        labels = _host_labels(labels).reshape(-1)
        if labels.shape[0] != b:
            raise ValueError(f"cls labels: expected shape ({b},), got {labels.shape}")
        n_cls = p["w"].shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= n_cls):
            raise ValueError(f"cls labels must be in [0, {n_cls}), got range [{labels.min()}, {labels.max()}]")
        # the pooled sums go through the host only for the (tiny) Allreduce over the group
        pooled = be.asarray(allreduce_sum(self.comm, be.to_host(h.sum(axis=1))) / total_tokens, h.dtype)
        logits = pooled @ p["w"] + p["b"]
        logp = _log_softmax(logits)
        lab = be.asarray(labels)
        loss_sum, correct = _stats_to_host(be, logp[xp.arange(b), lab], logits, lab)
        return loss_sum / b, (h.shape, pooled, logp, lab, p["w"], total_tokens), {"correct": correct, "count": b}

    def backward(self, cache):
        shape, pooled, logp, lab, w, total = cache
        xp = array_module(pooled)
        b = shape[0]
        dlogits = xp.exp(logp)
        dlogits[xp.arange(b), lab] -= 1.0
        dlogits /= b
        dpooled = dlogits @ w.T
        dh = xp.broadcast_to((dpooled / total)[:, None, :], shape).copy()
        rank0 = self.comm is None or self.comm.Get_rank() == 0
        gw = pooled.T @ dlogits if rank0 else xp.zeros_like(w)
        gb = dlogits.sum(axis=0) if rank0 else xp.zeros(w.shape[1], dtype=w.dtype)
        return dh, {"w": gw, "b": gb}


class TokenClassifier:
    """'lm' head: per-token Linear + softmax CE on labelled tokens (label -1 = ignore).

    forward(p, h, labels (batch, seq_local)) -> (loss, cache, stats); loss = (sum of CE over every
    labelled token of the whole sequence) / (global labelled count), both Allreduced over the group.
    Logits are computed only at labelled tokens (the loss ignores the rest), which keeps the head
    cheap for recall tasks. Grads are this rank's partial sums (already divided by the global count).
    """

    def __init__(self, comm=None):
        self.comm = comm

    def forward(self, p, h, labels):
        be = backends.backend_for(h)
        xp = be.xp
        b, s, w = h.shape
        labels = _host_labels(labels)
        if labels.shape != (b, s):
            raise ValueError(f"lm labels: expected shape {(b, s)} (batch, seq_local), got {labels.shape}")
        n_cls = p["w"].shape[1]
        sel = np.nonzero(labels.reshape(-1) >= 0)[0]
        lab = labels.reshape(-1)[sel]
        if lab.size and lab.max() >= n_cls:
            raise ValueError(f"lm labels must be -1 or in [0, {n_cls}), got max {lab.max()}")
        sel, lab = be.asarray(sel), be.asarray(lab)
        hs = h.reshape(-1, w)[sel]
        logits = hs @ p["w"] + p["b"]
        logp = _log_softmax(logits)
        n = len(lab)
        loss_sum, correct = _stats_to_host(be, logp[xp.arange(n), lab], logits, lab) if n else (0.0, 0)
        tot_loss, count, correct = allreduce_sum(self.comm, [loss_sum, n, correct])
        count = int(round(count))
        loss = float(tot_loss) / max(count, 1)
        return loss, (h.shape, sel, hs, logp, lab, p["w"], count), {"correct": int(round(correct)), "count": count}

    def backward(self, cache):
        shape, sel, hs, logp, lab, w, count = cache
        xp = array_module(hs)
        n = len(lab)
        dlogits = xp.exp(logp)
        dlogits[xp.arange(n), lab] -= 1.0
        dlogits /= max(count, 1)
        dh = xp.zeros((shape[0] * shape[1], shape[2]), dtype=hs.dtype)
        dh[sel] = dlogits @ w.T
        return dh.reshape(shape), {"w": hs.T @ dlogits, "b": dlogits.sum(axis=0)}
