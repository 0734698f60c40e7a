"""AdamW with decoupled weight decay, global gradient-norm clipping, warm-up + cosine schedule.

The training step's path: parameters, gradients and both moments in flat buffers of one layout
(flat.py), one backend call per span:

    hp = AdamWConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0,
                     warmup=100, total_steps=2000, min_lr_ratio=0.1)
    opt = FlatAdamW(params_flat)                          # m, v: FlatArrays of params_flat's layout
    gnorm = flat_global_norm(grads_flat)                  # sqrt(be.sum_squares) per dtype buffer
    opt.update(params_flat, grads_flat, lr_at(opt.step, hp), hp, grad_scale=clip_scale(gnorm, hp.clip))
    opt.state()                                           # {'step', 'm': {name: view}, 'v': {...}}

The same on name -> array dicts (one backend call per array; same arithmetic):

    state = init_state(params)                            # {'step': 0, 'm': {...}, 'v': {...}}
    gnorm = clip_grads(grads, hp.clip)                    # in place; returns the norm before clipping
    adamw_update(params, grads, state, lr_at(state['step'], hp), hp)

State is a plain dict of arrays plus an int step, so it checkpoints as is (flatten_state /
unflatten_state give a flat name -> array dict for .npz files); FlatAdamW.state() is that dict
over its views, so a checkpoint does not depend on the flat layout.

Weight decay is applied only to the weight matrices of Linear layers (model.is_decayed): not to
biases, LayerNorm gains/offsets or the token embedding. The decay is decoupled (AdamW): p -= lr *
wd * p, applied before the Adam step, independent of the gradient scale. Clipping multiplies the
gradients by clip_scale(norm, clip) (into the update as grad_scale on the flat path).
"""
import math
from dataclasses import dataclass

import numpy as np

from . import backends, flat
from .model import is_decayed


@dataclass
class AdamWConfig:
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0            # max global grad norm; <= 0 disables clipping
    warmup: int = 100            # linear warm-up steps
    total_steps: int = 1000      # cosine decays from lr to lr * min_lr_ratio over [warmup, total_steps]
    min_lr_ratio: float = 0.1
    decay_steps: int = 0         # > 0: hold lr from the warm-up until decay_start, then cosine over decay_steps
    decay_start: int = None      # the step the decay begins (the trainer: the final curriculum stage's first)


def lr_at(step, hp):
    """Learning rate for (0-based) step: linear warm-up to hp.lr, then cosine to hp.lr * min_lr_ratio,
    over [warmup, total_steps], or with decay_steps > 0 over decay_steps steps from decay_start (the
    peak held until then; None: not yet)."""
    if step < hp.warmup:
        return hp.lr * (step + 1) / hp.warmup
    if hp.decay_steps > 0:
        if hp.decay_start is None:
            return hp.lr
        begin, span = max(hp.decay_start, hp.warmup), hp.decay_steps
    else:
        begin, span = hp.warmup, max(hp.total_steps - hp.warmup, 1)
    t = min(max(step - begin, 0) / span, 1.0)
    lo = hp.lr * hp.min_lr_ratio
    return lo + 0.5 * (hp.lr - lo) * (1.0 + math.cos(math.pi * t))


def global_norm(grads):
    """sqrt(sum of squares) over every gradient array, accumulated in float64: one sum per array
    where the arrays are, the sums brought to the host in one transfer and added there in order."""
    if not grads:
        return 0.0
    be = backends.backend_for(**grads)
    sums = be.to_host(be.xp.stack([(g64 * g64).sum() for g64 in (g.astype(np.float64) for g in grads.values())]))
    tot = 0.0
    for s in sums:
        tot += float(s)
    return math.sqrt(tot)


def clip_scale(norm, max_norm):
    """The factor clipping multiplies the gradients by so that their global norm is <= max_norm
    (1.0 below it, or when max_norm <= 0 disables clipping)."""
    if max_norm and max_norm > 0 and norm > max_norm:
        return max_norm / (norm + 1e-6)
    return 1.0


def clip_grads(grads, max_norm):
    """Scale all grads in place so the global norm is <= max_norm. Returns the norm before clipping."""
    norm = global_norm(grads)
    s = clip_scale(norm, max_norm)
    if s != 1.0:
        for g in grads.values():
            g *= g.dtype.type(s)
    return norm


def flat_global_norm(grads):
    """The global gradient norm of a flat.FlatArrays: sqrt of the float64 sums of squares of its
    dtype buffers (the statistics tail excluded)."""
    tot = 0.0
    for dt in grads.layout.sizes:
        tot += grads.be.sum_squares(grads.used(dt))
    return math.sqrt(tot)


def init_state(params):
    """Zero first and second moments, step 0."""
    xp = backends.backend_for(**params).xp
    return {"step": 0,
            "m": {k: xp.zeros_like(v) for k, v in params.items()},
            "v": {k: xp.zeros_like(v) for k, v in params.items()}}


def _decay(hp, decayed):
    """The weight decay of an array or span: hp.weight_decay on decayed ones (model.is_decayed), else 0."""
    return hp.weight_decay if decayed else 0.0


def adamw_update(params, grads, state, lr, hp):
    """One AdamW step in place (params, state['m'], state['v'], state['step']); returns state.
    One backend call per array (contiguous arrays: their 1-D views are updated)."""
    if set(grads) != set(params):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise KeyError(f"grads and params differ: missing {missing[:5]}, unexpected {extra[:5]}")
    be = backends.backend_for(**params)
    t = state["step"] + 1
    for k, p in params.items():
        if not p.flags.c_contiguous:
            raise ValueError(f"adamw_update: parameter {k!r} is not contiguous (its update would go to a copy)")
        be.adamw_update(p.reshape(-1), grads[k].reshape(-1), state["m"][k].reshape(-1), state["v"][k].reshape(-1),
                        lr, hp.betas[0], hp.betas[1], hp.eps, _decay(hp, is_decayed(k)), t)
    state["step"] = t
    return state


class FlatAdamW:
    """AdamW moments in flat buffers of the parameters' layout, and the step count.

    update() is one backend adamw_update per span of the layout (the decayed arrays, then the
    others, per dtype), with the clipping factor as grad_scale; the gradients are not modified.
    """

    def __init__(self, params):
        self.layout, self.be = params.layout, params.be
        self.m = flat.FlatArrays(self.layout, self.be)
        self.v = flat.FlatArrays(self.layout, self.be)
        self.step = 0

    def update(self, params, grads, lr, hp, grad_scale=1.0):
        if params.layout != self.layout or grads.layout != self.layout:
            raise ValueError("FlatAdamW.update: params, grads and the moments must share one flat layout")
        t = self.step + 1
        for span in self.layout.spans:
            self.be.adamw_update(params.span(span), grads.span(span), self.m.span(span), self.v.span(span),
                                 lr, hp.betas[0], hp.betas[1], hp.eps, _decay(hp, span.decayed), t,
                                 grad_scale=grad_scale)
        self.step = t

    def state(self):
        """{'step', 'm', 'v'} as init_state's dict, the arrays views into the flat buffers."""
        return {"step": self.step, "m": self.m.arrays, "v": self.v.arrays}

    def load(self, state):
        """Copy a state dict (init_state's form; host or device arrays) into the flat buffers."""
        self.m.assign(state["m"])
        self.v.assign(state["v"])
        self.step = int(state["step"])


def flatten_state(state):
    """{'step', 'm', 'v'} -> flat dict: 'step' (int64 array), 'm/<name>', 'v/<name>'."""
    out = {"step": np.array(state["step"], dtype=np.int64)}
    for part in ("m", "v"):
        for k, a in state[part].items():
            out[f"{part}/{k}"] = a
    return out


def unflatten_state(arrays):
    """Inverse of flatten_state."""
    state = {"step": int(arrays["step"]), "m": {}, "v": {}}
    for key, a in arrays.items():
        if key != "step":
            part, name = key.split("/", 1)
            state[part][name] = a
    return state
