"""AdamW with decoupled weight decay, global gradient-norm clipping, warm-up + cosine schedule.

    hp = AdamWConfig(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, clip=1.0,
                     warmup=100, total_steps=2000, min_lr_ratio=0.1)
    state = init_state(params)                            # {'step': 0, 'm': {...}, 'v': {...}}
    gnorm = clip_grads(grads, hp.clip)                    # in place; returns the norm before clipping
    lr = lr_at(state['step'], hp)
    adamw_update(params, grads, state, lr, hp)            # updates params and state in place

State is a plain dict of arrays plus an int step, so it checkpoints as is (flatten_state /
unflatten_state give a flat name -> array dict for .npz files).

Weight decay is applied only to the weight matrices of Linear layers (model.is_decayed): not to
biases, LayerNorm gains/offsets or the token embedding. The decay is decoupled (AdamW): p -= lr *
wd * p, applied before the Adam step, independent of the gradient scale.
"""
import math
from dataclasses import dataclass

import numpy as np

from . import backends
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


def lr_at(step, hp):
    """Learning rate for (0-based) step: linear warm-up to hp.lr, then cosine to hp.lr * min_lr_ratio."""
    if step < hp.warmup:
        return hp.lr * (step + 1) / hp.warmup
    span = max(hp.total_steps - hp.warmup, 1)
    t = min(max(step - hp.warmup, 0) / span, 1.0)
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


def clip_grads(grads, max_norm):
    """Scale all grads in place so the global norm is <= max_norm. Returns the norm before clipping."""
    norm = global_norm(grads)
    if max_norm and max_norm > 0 and norm > max_norm:
        s = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= g.dtype.type(s)
    return norm


def init_state(params):
    """Zero first and second moments, step 0."""
    xp = backends.backend_for(**params).xp
    return {"step": 0,
            "m": {k: xp.zeros_like(v) for k, v in params.items()},
            "v": {k: xp.zeros_like(v) for k, v in params.items()}}


def adamw_update(params, grads, state, lr, hp):
    """One AdamW step in place (params, state['m'], state['v'], state['step']); returns state."""
    if set(grads) != set(params):
        missing = sorted(set(params) - set(grads))
        extra = sorted(set(grads) - set(params))
        raise KeyError(f"grads and params differ: missing {missing[:5]}, unexpected {extra[:5]}")
    xp = backends.backend_for(**params).xp
    b1, b2 = hp.betas
    t = state["step"] + 1
    c1 = 1.0 - b1 ** t  # bias corrections
    c2 = 1.0 - b2 ** t
    for k, p in params.items():
        g, m, v = grads[k], state["m"][k], state["v"][k]
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        if hp.weight_decay and is_decayed(k):
            p *= p.dtype.type(1.0 - lr * hp.weight_decay)
        p -= (lr / c1) * m / (xp.sqrt(v / c2) + hp.eps)
    state["step"] = t
    return state


def flatten_state(state):
    """{'step', 'm', 'v'} -> flat dict: 'step' (int64 array), 'm/<name>', 'v/<name>'."""
    flat = {"step": np.array(state["step"], dtype=np.int64)}
    for part in ("m", "v"):
        for k, a in state[part].items():
            flat[f"{part}/{k}"] = a
    return flat


def unflatten_state(flat):
    """Inverse of flatten_state."""
    state = {"step": int(flat["step"]), "m": {}, "v": {}}
    for key, a in flat.items():
        if key != "step":
            part, name = key.split("/", 1)
            state[part][name] = a
    return state
