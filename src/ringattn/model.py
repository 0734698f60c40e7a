"""The Blockwise Transformer: pre-LN blocks of (ring) attention and blockwise feed-forward.

    cfg = ModelConfig(vocab=224, width=64, layers=2, heads=2, causal=True, head="lm", n_classes=32)
    params = init_params(cfg, seed=0)                 # dict name -> array, same on every rank
    model = BlockwiseTransformer(cfg, attn, comm)     # attn: ringattn.Ring or layers.LocalAttention
    loss, grads, stats = model.loss_and_grads(params, x_local, positions, labels)
    loss, grads, stats = model.loss_and_grads(params, x_local, positions, labels, grads=views)  # written into
    loss, stats = model.evaluate(params, x_local, positions, labels)

x_local: this rank's shard of the sequence, (batch, s_local) int token ids ('tokens' input) or
(batch, s_local, in_features) floats ('real' input): NumPy, or device arrays when the parameters
are (ringattn.backends decides from the parameters; host inputs are copied to their device).
positions: the GLOBAL positions of those tokens (int array (s_local,), e.g. ring.positions(total));
they feed RoPE. labels (host or device; checked on the host): (batch,) for
the 'cls' head, (batch, s_local) with -1 = ignore for the 'lm' head. comm: the sequence-parallel
group communicator (the ring's group), None for one process.

Returned values:
- loss: the global mean loss of the whole sequence batch (identical on every rank of the group).
- grads: this rank's PARTIAL gradients (sums over its own tokens); the trainer sums them over the
  sequence group (Allreduce) and averages over data-parallel groups. The 'cls' classifier's
  weights (head.w, head.b) get their gradient on group rank 0 only (zeros on the others), so
  the sum over the group counts them once.
- stats: {'correct', 'count'} over the whole sequence group (for accuracy).
- grads= (a dict name -> array shaped like params, e.g. views of one flat buffer): the same
  gradients are written into those arrays (every element overwritten) and that dict is returned.

Sequence parallelism is exact: every per-token layer is local, attention is exact over the ring,
the pooled mean and the token-loss normaliser are Allreduced, so loss and summed grads equal the
single-process ones up to float rounding.

Parameter names: embed.w | in_proj.w, in_proj.b; blocks.{i}.{ln1.g, ln1.b, attn.wqkv, attn.bqkv,
attn.wo, attn.bo, ln2.g, ln2.b, ffn.w1, ffn.b1, ffn.w2, ffn.b2}; ln_f.g, ln_f.b; head.w, head.b.
"""
from dataclasses import asdict, dataclass

import numpy as np

from . import backends
from . import layers as L


@dataclass
class ModelConfig:
    vocab: int = 256             # token vocabulary ('tokens' input)
    width: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 0            # 0 = heads (no GQA)
    causal: bool = True
    window: int = -1             # sliding window: keys at most this many positions away (-1: none)
    local_window: int = -1       # >= 0: the local layers (layer_window) use this window instead (-1: none)
    input: str = "tokens"        # 'tokens' | 'real'
    in_features: int = 1         # 'real' input features
    head: str = "lm"             # 'cls' (mean-pooled sequence classifier) | 'lm' (per-token)
    n_classes: int = 2
    ffn_chunk: int = 256         # tokens per FFN chunk (activation memory ~ chunk x 4 width)
    init_std: float = 0.1        # N(0, init_std) for the Linear weights
    embed_std: float = 1.0       # N(0, embed_std) for the token embedding (see init_params)
    dtype: str = "float32"       # 'float32' | 'float64'
    rope_base: float = 10000.0

    def __post_init__(self):
        if self.input not in ("tokens", "real"):
            raise ValueError(f"input must be 'tokens' or 'real', got {self.input!r}")
        if self.head not in ("cls", "lm"):
            raise ValueError(f"head must be 'cls' or 'lm', got {self.head!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if (self.width // self.heads) % 2:
            raise ValueError(f"head dim width/heads = {self.width // self.heads} must be even (RoPE)")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        for name in ("window", "local_window"):
            w = getattr(self, name)
            if isinstance(w, bool) or not isinstance(w, int) or w < -1:
                raise ValueError(f"{name} must be an int >= 0, or -1 for none; got {w!r}")
        for name in ("width", "layers", "heads", "n_classes", "ffn_chunk", "vocab", "in_features"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def n_kv_heads(self):
        return self.kv_heads or self.heads

    @property
    def head_dim(self):
        return self.width // self.heads

    def layer_window(self, i):
        """The sliding window of layer i (-1: none). With a local_window, layers alternate local and
        global, starting local, and the last layer is always global: local layers see only nearby
        tokens (cheap at any length), global ones the whole sequence (or `window`)."""
        local = self.local_window >= 0 and i % 2 == 0 and i < self.layers - 1
        return self.local_window if local else self.window

    def to_dict(self):
        return asdict(self)

    @classmethod
    def for_task(cls, task, in_features=8, **overrides):
        """The config a task (tasks/) needs (head, causal, input kind, vocab, classes) plus overrides."""
        from . import tasks
        info = tasks.get(task).info(in_features=in_features)
        base = {k: info[k] for k in ("head", "causal", "input", "vocab", "n_classes")}
        if info["input"] == "real":
            base["in_features"] = info["in_features"]
        return cls(**{**base, **overrides})


def param_shapes(cfg):
    """Ordered name -> shape. The order fixes the random stream of init_params."""
    w, d = cfg.width, cfg.head_dim
    s = {}
    if cfg.input == "tokens":
        s["embed.w"] = (cfg.vocab, w)
    else:
        s["in_proj.w"] = (cfg.in_features, w)
        s["in_proj.b"] = (w,)
    for i in range(cfg.layers):
        p = f"blocks.{i}."
        s[p + "ln1.g"] = (w,)
        s[p + "ln1.b"] = (w,)
        s[p + "attn.wqkv"] = (w, (cfg.heads + 2 * cfg.n_kv_heads) * d)
        s[p + "attn.bqkv"] = ((cfg.heads + 2 * cfg.n_kv_heads) * d,)
        s[p + "attn.wo"] = (cfg.heads * d, w)
        s[p + "attn.bo"] = (w,)
        s[p + "ln2.g"] = (w,)
        s[p + "ln2.b"] = (w,)
        s[p + "ffn.w1"] = (w, 4 * w)
        s[p + "ffn.b1"] = (4 * w,)
        s[p + "ffn.w2"] = (4 * w, w)
        s[p + "ffn.b2"] = (w,)
    s["ln_f.g"] = (w,)
    s["ln_f.b"] = (w,)
    s["head.w"] = (w, cfg.n_classes)
    s["head.b"] = (cfg.n_classes,)
    return s


def init_params(cfg, seed=0):
    """Deterministic init, identical on every rank: Linear weights N(0, init_std), token embedding
    N(0, embed_std), biases 0, LN gain 1.

    Why the embedding is larger: with a unit-scale embedding the token identity dominates the
    residual stream, and needle's key->value lookup forms within ~150 steps at length 12; with
    the embedding at 0.1 it stayed on the bag-of-tokens plateau (accuracy 1/4) for 3000 steps.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "g":
            a = np.ones(shape)
        elif len(shape) == 1:
            a = np.zeros(shape)
        else:
            a = rng.standard_normal(shape) * (cfg.embed_std if name == "embed.w" else cfg.init_std)
        params[name] = a.astype(cfg.dtype)
    return params


def is_decayed(name):
    """Weight decay goes on matrices of Linear layers only: not biases, LayerNorm or the embedding."""
    leaf = name.rsplit(".", 1)[1]
    return leaf.startswith("w") and not name.startswith("embed.")


def _sub(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _add(grads, prefix, g):
    for k, v in g.items():
        grads[prefix + k] = v


def _scope(ws, name):
    return None if ws is None else ws.scope(name)


def check_grads(params, grads):
    """grads= of loss_and_grads: one array per parameter, same shape, dtype and side; else ValueError."""
    if set(grads) != set(params):
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        raise ValueError(f"grads: expected one array per parameter; missing {missing}, unexpected {extra}")
    for k, p in params.items():
        g = grads[k]
        if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
            raise ValueError(f"grads[{k!r}]: expected shape {tuple(p.shape)} dtype {p.dtype}, "
                             f"got {tuple(g.shape)} {g.dtype}")
    backends.backend_for(**{"params": params["ln_f.g"]}, **{f"grads[{k!r}]": g for k, g in grads.items()})


class BlockwiseTransformer:
    """Pre-LN Transformer over one rank's shard; see the module docstring for the contract.

    The residual stream: each block's branch output (attention, then feed-forward) is added into
    the stream by the NEXT LayerNorm (fused add + LN, written into the branch's buffer, so the
    stream before the add stays intact for the earlier LayerNorm's backward); in the backward one
    buffer holds the stream's gradient and every LayerNorm backward adds into it in place.
    loss_and_grads keeps its activations and temporaries in a Workspace reused across steps
    (evaluate allocates afresh: its batch may be larger than training's). Models called one after
    another (the trainer's one per sequence-parallel size) may share one workspace= so that only the
    current shapes stay allocated; never share one between models called from different threads.
    """

    def __init__(self, cfg, attn, comm=None, workspace=None):
        self.cfg, self.attn, self.comm = cfg, attn, comm
        self.embed = L.Embedding() if cfg.input == "tokens" else L.InputProjection()
        self.ln = L.LayerNorm()
        self.attention = [L.Attention(cfg.heads, cfg.head_dim, attn, causal=cfg.causal, kv_heads=cfg.n_kv_heads,
                                      window=cfg.layer_window(i)) for i in range(cfg.layers)]  # one per layer
        self.ffn = L.FeedForward(cfg.ffn_chunk)
        self.rope = L.Rope(cfg.rope_base)
        self.head = L.MeanPoolClassifier(comm) if cfg.head == "cls" else L.TokenClassifier(comm)
        self.workspace = L.Workspace() if workspace is None else workspace

    def _check(self, x, positions):
        cfg = self.cfg
        want = 2 if cfg.input == "tokens" else 3
        if x.ndim != want:
            raise ValueError(f"x: expected {want} dims for input={cfg.input!r}, got shape {tuple(x.shape)}")
        if cfg.input == "real" and x.shape[2] != cfg.in_features:
            raise ValueError(f"x: expected {cfg.in_features} features, got {x.shape[2]}")
        if len(positions) != x.shape[1]:
            raise ValueError(f"positions: {len(positions)} entries for a shard of {x.shape[1]} tokens")

    def _norm(self, params, name, h, branch, ws):
        """LayerNorm `name` of the residual stream h + branch (branch None: of h alone); the sum goes
        into branch's buffer. Returns (the stream, the LN output, the LN's cache)."""
        if branch is None:
            y, c = self.ln.forward(_sub(params, name), h, ws=_scope(ws, name))
            return h, y, c
        y, c = self.ln.forward(_sub(params, name), branch, add=h, ws=_scope(ws, name))
        return branch, y, c

    def _forward(self, params, x, positions, labels, ws=None):
        cfg = self.cfg
        self._check(x, positions)
        dt = np.dtype(cfg.dtype)
        be = backends.backend_for(params["ln_f.g"])  # the parameters' side: inputs and tables go there
        caches = {}
        if cfg.input == "tokens":
            emb = "embed."
            h, caches["embed"] = self.embed.forward(_sub(params, emb), be.asarray(x), ws=_scope(ws, emb))
        else:
            emb = "in_proj."
            h, caches["embed"] = self.embed.forward(_sub(params, emb), be.asarray(x, dt), ws=_scope(ws, emb))
        tables = self.rope.tables(positions, cfg.head_dim, dt, be.xp)
        branch = None  # the last branch's output, not yet added into the stream h
        for i in range(cfg.layers):
            p = f"blocks.{i}."
            h, a, c1 = self._norm(params, p + "ln1.", h, branch, ws)
            branch, c2 = self.attention[i].forward(_sub(params, p + "attn."), a, tables, ws=_scope(ws, p + "attn."))
            h, f, c3 = self._norm(params, p + "ln2.", h, branch, ws)
            branch, c4 = self.ffn.forward(_sub(params, p + "ffn."), f, ws=_scope(ws, p + "ffn."))
            caches[i] = (c1, c2, c3, c4)
        h, y, caches["ln_f"] = self._norm(params, "ln_f.", h, branch, ws)
        if cfg.head == "cls":
            total = int(L.allreduce_sum(self.comm, [x.shape[1]])[0])  # whole-sequence length
            loss, caches["head"], stats = self.head.forward(_sub(params, "head."), y, labels, total)
        else:
            loss, caches["head"], stats = self.head.forward(_sub(params, "head."), y, labels)
        return loss, stats, caches, emb

    def loss_and_grads(self, params, x_local, positions, labels, grads=None):
        """Forward and backward on this rank's shard -> (global loss, partial grads, global stats).

        grads=None: the gradients are fresh arrays. grads = a dict name -> array (shaped like params,
        e.g. views of one flat buffer): every gradient is written into it, and it is returned."""
        if grads is not None:
            check_grads(params, grads)
        ws = self.workspace
        loss, stats, caches, emb = self._forward(params, x_local, positions, labels, ws)
        out = {} if grads is None else grads

        def into(prefix):  # the caller's arrays for this layer's gradients (None: the layer makes fresh ones)
            return None if grads is None else _sub(grads, prefix)

        def keep(prefix, g):
            if grads is None:
                _add(out, prefix, g)

        bw = ws.scope("backward")  # temporaries of the backward: shared by the blocks
        dy, g = self.head.backward(caches["head"], grads=into("head."), ws=_scope(bw, "head"))
        keep("head.", g)
        dh, g = self.ln.backward(dy, caches["ln_f"], grads=into("ln_f."), ws=_scope(bw, "ln_f"))
        keep("ln_f.", g)
        # dh: the residual stream's gradient, one buffer from here on (each LN backward adds into it)
        for i in reversed(range(self.cfg.layers)):
            p = f"blocks.{i}."
            c1, c2, c3, c4 = caches[i]
            df, g = self.ffn.backward(dh, c4, grads=into(p + "ffn."), ws=_scope(bw, "ffn"))
            keep(p + "ffn.", g)
            _, g = self.ln.backward(df, c3, grads=into(p + "ln2."), residual=dh)
            keep(p + "ln2.", g)
            da, g = self.attention[i].backward(dh, c2, grads=into(p + "attn."), ws=_scope(bw, "attn"))
            keep(p + "attn.", g)
            _, g = self.ln.backward(da, c1, grads=into(p + "ln1."), residual=dh)
            keep(p + "ln1.", g)
        _, g = self.embed.backward(dh, caches["embed"], grads=into(emb), ws=_scope(bw, "embed"))
        keep(emb, g)
        return loss, out, stats

    def evaluate(self, params, x_local, positions, labels):
        """Forward only -> (global loss, global stats)."""
        loss, stats, _, _ = self._forward(params, x_local, positions, labels)
        return loss, stats
