"""AdamW, gradient clipping and the learning-rate schedule, against straightforward scalar references."""
import math

import numpy as np
import pytest

from ringattn import optim as O


def ref_adamw(p, g_seq, lr_seq, hp, decay):
    """Per-element AdamW written out as scalars (the textbook algorithm with decoupled decay)."""
    p = p.astype(np.float64).ravel().copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    b1, b2 = hp.betas
    for t, (g, lr) in enumerate(zip(g_seq, lr_seq), start=1):
        g = g.ravel()
        for i in range(p.size):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            if decay:
                p[i] -= lr * hp.weight_decay * p[i]
            p[i] -= lr * (m[i] / (1 - b1 ** t)) / (math.sqrt(v[i] / (1 - b2 ** t)) + hp.eps)
    return p


def test_adamw_matches_reference_and_decay_rule():
    rng = np.random.default_rng()
    hp = O.AdamWConfig(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    params = {"blocks.0.attn.wqkv": rng.standard_normal((3, 4)), "blocks.0.attn.bqkv": rng.standard_normal(4),
              "blocks.0.ln1.g": rng.standard_normal(4), "embed.w": rng.standard_normal((5, 4)),
              "head.w": rng.standard_normal((4, 2))}
    start = {k: v.copy() for k, v in params.items()}
    state = O.init_state(params)
    gs = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    lrs = [1e-2, 5e-3, 2e-2, 1e-3]
    for g, lr in zip(gs, lrs):
        O.adamw_update(params, g, state, lr, hp)
    assert state["step"] == 4
    for k in params:
        decay = k in ("blocks.0.attn.wqkv", "head.w")  # Linear weight matrices only
        assert O.is_decayed(k) == decay
        ref = ref_adamw(start[k], [g[k] for g in gs], lrs, hp, decay)
        err = np.linalg.norm(params[k].ravel() - ref) / np.linalg.norm(ref)
        assert err < 1e-13, (k, err)


def test_adamw_float32_state_roundtrip():
    rng = np.random.default_rng()
    params = {"a.w": rng.standard_normal((3, 3)).astype(np.float32)}
    state = O.init_state(params)
    O.adamw_update(params, {"a.w": rng.standard_normal((3, 3)).astype(np.float32)}, state, 1e-3, O.AdamWConfig())
    assert params["a.w"].dtype == np.float32 and state["m"]["a.w"].dtype == np.float32
    back = O.unflatten_state(O.flatten_state(state))
    assert back["step"] == 1 and np.array_equal(back["v"]["a.w"], state["v"]["a.w"])
    with pytest.raises(KeyError, match="missing"):
        O.adamw_update(params, {}, state, 1e-3, O.AdamWConfig())


def test_clipping():
    rng = np.random.default_rng()
    g = {"a": rng.standard_normal((4, 5)) * 3, "b": rng.standard_normal(7) * 3}
    orig = {k: v.copy() for k, v in g.items()}
    norm = math.sqrt(sum((v ** 2).sum() for v in orig.values()))
    assert abs(O.clip_grads(g, 1.0) - norm) < 1e-12 * norm
    assert abs(O.global_norm(g) - 1.0) < 1e-5
    for k in g:  # same direction
        np.testing.assert_allclose(g[k] * norm, orig[k], rtol=1e-5)
    small = {"a": np.full(3, 0.1)}
    O.clip_grads(small, 1.0)
    assert np.all(small["a"] == 0.1)  # below the threshold: untouched


def test_schedule():
    hp = O.AdamWConfig(lr=3e-3, warmup=10, total_steps=110, min_lr_ratio=0.1)
    lrs = [O.lr_at(s, hp) for s in range(130)]
    assert abs(lrs[0] - 3e-4) < 1e-15 and abs(lrs[9] - 3e-3) < 1e-15
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))            # linear warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))              # cosine decay
    assert abs(lrs[60] - (3e-4 + 0.5 * 2.7e-3)) < 1e-15                 # half way: midpoint
    assert abs(lrs[110] - 3e-4) < 1e-15 and lrs[129] == lrs[110]        # floor after the end


def test_schedule_with_decay_steps_holds_the_peak_until_the_decay_starts():
    hp = O.AdamWConfig(lr=3e-3, warmup=10, total_steps=1000, min_lr_ratio=0.1, decay_steps=40)
    assert abs(O.lr_at(3, hp) - 3e-3 * 4 / 10) < 1e-15          # the warm-up is unchanged
    assert [O.lr_at(s, hp) for s in (10, 200, 900)] == [3e-3] * 3  # no start yet: the peak
    hp.decay_start = 50
    lrs = [O.lr_at(s, hp) for s in range(120)]
    assert lrs[10:51] == [3e-3] * 41                             # held until the start
    assert all(a > b for a, b in zip(lrs[50:90], lrs[51:91]))    # cosine over decay_steps
    assert abs(lrs[70] - (3e-4 + 0.5 * 2.7e-3)) < 1e-15          # half way: midpoint
    assert lrs[90] == lrs[119] and abs(lrs[90] - 3e-4) < 1e-15   # floor after decay_steps
    hp.decay_start = 0                                           # a start inside the warm-up: decay after it
    assert abs(O.lr_at(10, hp) - 3e-3) < 1e-15 and abs(O.lr_at(30, hp) - (3e-4 + 0.5 * 2.7e-3)) < 1e-15
