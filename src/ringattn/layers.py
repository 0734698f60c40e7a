"""Layers of the Blockwise Transformer, each with an explicit forward and backward (no autograd).

Every layer is a small class holding only static settings; parameters are passed in as a dict of
arrays named locally ('w', 'b', 'g', ...), so the model can keep one flat name -> array dict.

    out, cache = layer.forward(p, x, ..., ws=None)
    dx, grads  = layer.backward(dout, cache, grads=None, ws=None)   # grads: dict with the same keys as p

grads=None: fresh gradient arrays; a dict of arrays: the gradients are WRITTEN into them (e.g. views
of one flat buffer). ws=None: outputs are fresh arrays; a Workspace (scope): outputs go to buffers
reused across calls, so what a call returns is valid only until the next call with the same scope
(the model gives every layer call of a step its own scope). Backward never changes dout or the
cache (the exceptions say so: LayerNorm's residual=, Attention's backward reusing the QKV buffer). Shapes: activations are
(batch, seq_local, width); attention heads are (batch, seq_local, heads, head_dim).

Layers here: Linear, LayerNorm (optionally with the residual add fused), Embedding (token ids),
InputProjection (real-valued inputs, a Linear), Rope (rotary embedding from GLOBAL positions, in place
on the QKV buffer), Attention (QKV projection, RoPE on q/k, exact attention through an `attn` object,
output projection),
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


class Workspace:
    """Buffers kept across steps, so that a training step allocates (almost) nothing new.

    get(name, shape, dtype, be) returns the array this name got last time when its shape, dtype and
    side (host/device) still match, else a new be.empty one that replaces it (so a new shape costs
    one allocation and old shapes are not hoarded). scope(prefix) is the same store under prefixed
    names: the model gives each layer call its own scope. Contents carry no meaning across calls:
    whoever gets a buffer overwrites it.
    """

    def __init__(self, store=None, prefix=""):
        self._store = {} if store is None else store
        self._prefix = prefix

    def scope(self, prefix):
        return Workspace(self._store, f"{self._prefix}{prefix}/")

    def get(self, name, shape, dtype, be):
        key, shape, dtype = self._prefix + name, tuple(shape), np.dtype(dtype)
        a = self._store.get(key)
        if a is None or a.shape != shape or a.dtype != dtype or not be.is_mine(a):
            a = self._store[key] = be.empty(shape, dtype)
        return a


def buffer(ws, name, shape, dtype, be):
    """An output buffer: the workspace's (ws, reused across steps) or, with ws None, a fresh one."""
    return be.empty(shape, dtype) if ws is None else ws.get(name, shape, dtype, be)


def grads_into(grads, like):
    """The arrays a backward writes its parameter gradients into: the caller's `grads` (name -> array,
    e.g. views of one flat buffer; every entry is overwritten), or fresh ones shaped like `like`."""
    if grads is not None:
        return grads
    return {k: array_module(a).empty_like(a) for k, a in like.items()}


class Linear:
    """y = x @ w + b over the last axis. p: w (in, out), b (out,).

    One GEMM over all tokens ((tokens, in) @ (in, out)) with the bias add fused, into the output
    buffer; the backward writes dx, dW, db (overwritten) in one call: be.linear_forward /
    be.linear_backward (the project's GEMM on the CPU).
    """

    def forward(self, p, x, ws=None):
        be = backends.backend_for(x)
        w = p["w"]
        x2 = be.ascontiguous(x.reshape(-1, x.shape[-1]))
        y = be.linear_forward(x2, w, p["b"], out=buffer(ws, "y", (x2.shape[0], w.shape[1]), x.dtype, be))
        return y.reshape(*x.shape[:-1], w.shape[1]), (x2, w, x.shape)

    def backward(self, dy, cache, grads=None, ws=None):
        x2, w, shape = cache
        be = backends.backend_for(dy)
        dy2 = be.ascontiguous(dy.reshape(-1, dy.shape[-1]))
        g = grads_into(grads, {"w": w, "b": w[0]})
        dx = be.linear_backward(dy2, x2, w, g["w"], g["b"], dx=buffer(ws, "dx", x2.shape, dy.dtype, be))
        return dx.reshape(shape), g


class InputProjection(Linear):
    """Real-valued inputs (batch, seq, in_features) -> (batch, seq, width): a Linear."""


class LayerNorm:
    """y = (x - mean) / sqrt(var + eps) * g + b over the last axis. p: g, b (width,).

    forward(p, x, add=a): the pre-LN block's residual add fused in: x += a IN PLACE, then y = LN(x)
    (x must be contiguous: it is the residual stream's buffer). backward(..., residual=r): the
    backward's residual add fused in: r += dx in place, and r is returned as dx. Both are the
    backend's kernels (be.layernorm_forward / add_layernorm_forward / layernorm_backward).
    """

    def __init__(self, eps=1e-5):
        self.eps = eps

    def forward(self, p, x, add=None, ws=None):
        be = backends.backend_for(x)
        if add is not None and not x.flags.c_contiguous:
            raise ValueError("LayerNorm forward(add=): x must be C-contiguous (the sum is written into it)")
        w = x.shape[-1]
        x2 = x.reshape(-1, w)
        y = buffer(ws, "y", x2.shape, x.dtype, be)
        if add is None:
            _, mean, rstd = be.layernorm_forward(x2, p["g"], p["b"], self.eps, out=y)
        else:
            _, mean, rstd = be.add_layernorm_forward(x2, add.reshape(-1, w), p["g"], p["b"], self.eps, out=y)
        return y.reshape(x.shape), (x2, p["g"], mean, rstd)

    def backward(self, dy, cache, grads=None, residual=None, ws=None):
        x2, g, mean, rstd = cache
        be = backends.backend_for(dy)
        gr = grads_into(grads, {"g": g, "b": g})
        dy2 = dy.reshape(x2.shape)
        if residual is not None:
            dx = be.layernorm_backward(dy2, x2, g, mean, rstd, gr["g"], gr["b"], residual=residual.reshape(x2.shape))
        else:
            dx = be.layernorm_backward(dy2, x2, g, mean, rstd, gr["g"], gr["b"],
                                       dx=buffer(ws, "dx", x2.shape, dy.dtype, be))
        return dx.reshape(dy.shape), gr


class Embedding:
    """Token ids (batch, seq) -> rows of w (vocab, width). dx is None (ids have no gradient)."""

    def forward(self, p, ids, ws=None):
        w = p["w"]
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= w.shape[0]):
            raise ValueError(f"token ids must be in [0, {w.shape[0]}), got range [{int(ids.min())}, {int(ids.max())}]")
        be = backends.backend_for(w)
        y = buffer(ws, "y", (ids.size, w.shape[1]), w.dtype, be)
        be.xp.take(w, ids.reshape(-1), axis=0, out=y)
        return y.reshape(*ids.shape, w.shape[1]), (ids, w)

    def backward(self, dy, cache, grads=None, ws=None):
        ids, w = cache
        be = backends.backend_for(dy)
        g = grads_into(grads, {"w": w})
        be.embedding_backward(ids.reshape(-1), be.ascontiguous(dy.reshape(-1, w.shape[1])), g["w"])  # overwrites
        return None, g


class Rope:
    """Rotary position embedding of the q and k heads, IN PLACE on the QKV projection's output.

    qkv is (batch, seq, (heads + 2*kv_heads) * head_dim): planes q, k, v (see Attention); pair i of a
    q or k head is (x[i], x[i + dim/2]) rotated by angle pos * base**(-2i/dim), where pos is the
    GLOBAL position of the token (under zigzag/striped layouts a rank's tokens are not contiguous).
    Angles are computed in float64 so large positions keep their precision. The backend's be.rope.
    """

    def __init__(self, base=10000.0):
        self.base = float(base)

    def tables(self, positions, dim, dtype, xp=np):
        """(cos, sin), each (seq, dim/2), for the given global positions."""
        if dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {dim}")
        inv = self.base ** (-np.arange(0, dim // 2, dtype=np.float64) * 2.0 / dim)
        ang = np.asarray(positions, dtype=np.float64)[:, None] * inv[None, :]
        return xp.asarray(np.cos(ang), dtype=dtype), xp.asarray(np.sin(ang), dtype=dtype)

    @staticmethod
    def forward(qkv, tables, heads, kv_heads, head_dim):
        """Rotate q and k in place; returns qkv."""
        backends.backend_for(qkv).rope(qkv, *tables, heads, kv_heads, head_dim)
        return qkv

    @staticmethod
    def backward(dqkv, tables, heads, kv_heads, head_dim):
        """In place: the transpose of a rotation is the rotation by the opposite angle."""
        backends.backend_for(dqkv).rope(dqkv, *tables, heads, kv_heads, head_dim, inverse=True)
        return dqkv


class Attention:
    """Multi-head self-attention: x @ wqkv + bqkv -> q, k, v; RoPE on q, k; attn; @ wo + bo.

    p: wqkv (width, (heads + 2*kv_heads) * head_dim), bqkv, wo (heads * head_dim, width), bo.
    kv_heads < heads is grouped-query attention (heads % kv_heads == 0).
    window >= 0: sliding window, each query sees the keys at most `window` positions before it (and
    after it too when not causal), in global positions; -1: no window.

    q, k, v go to `attn` as strided views of the one QKV buffer (RoPE rotated in place; the kernels
    take any strides whose last axis is contiguous). In the backward dq, dk, dv are copied into that
    same buffer (q, k, v are no longer needed; the attn API returns the gradients as separate arrays:
    that copy is the one left), rotated back in place, and go through the projection's backward as
    one GEMM. So the backward consumes its cache: one backward per forward.
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

    def _planes(self, qkv):
        """(q, k, v) as (batch, seq, heads, head_dim) views of qkv's planes."""
        b, s, _ = qkv.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        x = qkv.reshape(b, s, h + 2 * hk, d)
        return x[:, :, :h], x[:, :, h : h + hk], x[:, :, h + hk :]

    def _sub(self, ws, name):
        return None if ws is None else ws.scope(name)

    def forward(self, p, x, rope_tables, ws=None):
        b, s, _ = x.shape
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        qkv, c_qkv = self.proj.forward({"w": p["wqkv"], "b": p["bqkv"]}, x, ws=self._sub(ws, "qkv"))
        Rope.forward(qkv, rope_tables, h, hk, d)
        q, k, v = self._planes(qkv)
        o, lse = self.attn.attention_forward(q, k, v, **self.mask_kw)
        y, c_o = self.proj.forward({"w": p["wo"], "b": p["bo"]}, o.reshape(b, s, h * d), ws=self._sub(ws, "o"))
        return y, (c_qkv, qkv, o, lse, c_o, rope_tables)

    def backward(self, dy, cache, grads=None, ws=None):
        c_qkv, qkv, o, lse, c_o, tables = cache
        h, hk, d = self.heads, self.kv_heads, self.head_dim
        g = grads_into(grads, {"wqkv": c_qkv[1], "bqkv": c_qkv[1][0], "wo": c_o[1], "bo": c_o[1][0]})
        do, _ = self.proj.backward(dy, c_o, grads={"w": g["wo"], "b": g["bo"]}, ws=self._sub(ws, "o"))
        q, k, v = self._planes(qkv)
        dq, dk, dv = self.attn.attention_backward(do.reshape(o.shape), q, k, v, o, lse, **self.mask_kw)
        # q, k, v are dead now: their buffer takes dq, dk, dv (this backward consumes its cache)
        dqkv = qkv
        for plane, grad in zip(self._planes(dqkv), (dq, dk, dv)):
            plane[...] = grad
        Rope.backward(dqkv, tables, h, hk, d)
        dx, _ = self.proj.backward(dqkv, c_qkv, grads={"w": g["wqkv"], "b": g["bqkv"]}, ws=self._sub(ws, "qkv"))
        return dx, g


class FeedForward:
    """Blockwise MLP y = gelu_tanh(x @ w1 + b1) @ w2 + b2 over chunks of `chunk` tokens.

    p: w1 (width, hidden), b1 (hidden,), w2 (hidden, width), b2 (width,); hidden = 4 x width in the
    model. Only x is cached: the hidden activation is recomputed chunk by chunk in the backward
    kernel, so activation memory is O(chunk x hidden), not O(tokens x hidden).
    """

    def __init__(self, chunk=256):
        self.chunk = int(chunk)

    def forward(self, p, x, ws=None):
        be = backends.backend_for(x)
        x2 = be.ascontiguous(x.reshape(-1, x.shape[-1]))
        y = be.ffn_forward(x2, p["w1"], p["b1"], p["w2"], p["b2"], chunk=self.chunk,
                           out=buffer(ws, "y", x2.shape, x.dtype, be))
        return y.reshape(x.shape), (x2, p, x.shape)

    def backward(self, dy, cache, grads=None, ws=None):
        x2, p, shape = cache
        be = backends.backend_for(dy)
        g = grads_into(grads, {k: p[k] for k in ("w1", "b1", "w2", "b2")})
        dy2 = be.ascontiguous(dy.reshape(-1, shape[-1]))
        dx = be.ffn_backward(x2, p["w1"], p["b1"], p["w2"], p["b2"], dy2, g["w1"], g["b1"], g["w2"], g["b2"],
                             chunk=self.chunk, dx=buffer(ws, "dx", x2.shape, x2.dtype, be), accumulate=False)
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


class MeanPoolClassifier:
    """'cls' head: mean over ALL tokens of the whole sequence (across the group), Linear, softmax CE.

    forward(p, h, labels (batch,), total_tokens) -> (loss, cache, stats); loss = mean CE over the batch.
    backward(cache) -> (dh, grads). The pooled vector is reduced with an Allreduce of the local sums,
    so it is identical on every rank; hence the classifier's own grads (w, b) are identical on every
    rank too and are returned ONLY on group rank 0 (zeros elsewhere), so that the trainer's sum over
    the group counts them once. dh (this rank's tokens) is a true partial gradient on every rank.
    Both heads take (softmax - onehot) from be.softmax_xent in the forward and divide it by the
    loss's normaliser in the backward.
    """

    def __init__(self, comm=None):
        self.comm = comm

    def forward(self, p, h, labels, total_tokens):
        be = backends.backend_for(h)
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
        loss_sum, correct, dlogits = be.softmax_xent(logits, be.asarray(labels), 1.0)
        return loss_sum / b, (h.shape, pooled, dlogits, p["w"], total_tokens), {"correct": correct, "count": b}

    def backward(self, cache, grads=None, ws=None):
        shape, pooled, dlogits, w, total = cache
        be = backends.backend_for(pooled)
        xp = be.xp
        dlogits = dlogits / shape[0]
        dpooled = dlogits @ w.T
        dh = buffer(ws, "dh", shape, pooled.dtype, be)
        dh[...] = (dpooled / total)[:, None, :]
        g = grads_into(grads, {"w": w, "b": w[0]})
        if self.comm is None or self.comm.Get_rank() == 0:
            xp.matmul(pooled.T, dlogits, out=g["w"])
            dlogits.sum(axis=0, out=g["b"])
        else:
            g["w"][...] = 0
            g["b"][...] = 0
        return dh, g


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
        loss_sum, correct, dlogits = be.softmax_xent(logits, lab, 1.0)
        tot_loss, count, correct = allreduce_sum(self.comm, [loss_sum, len(lab), correct])
        count = int(round(count))
        loss = float(tot_loss) / max(count, 1)
        return loss, (h.shape, sel, hs, dlogits, p["w"], count), {"correct": int(round(correct)), "count": count}

    def backward(self, cache, grads=None, ws=None):
        shape, sel, hs, dlogits, w, count = cache
        be = backends.backend_for(hs)
        xp = be.xp
        dlogits = dlogits / max(count, 1)
        dh = buffer(ws, "dh", (shape[0] * shape[1], shape[2]), hs.dtype, be)
        dh[...] = 0
        dh[sel] = dlogits @ w.T
        g = grads_into(grads, {"w": w, "b": w[0]})
        xp.matmul(hs.T, dlogits, out=g["w"])
        dlogits.sum(axis=0, out=g["b"])
        return dh.reshape(shape), g
