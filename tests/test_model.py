"""Blockwise Transformer: finite-difference gradient checks (float64) for every layer and the whole
model, and exact sequence parallelism (same loss and summed grads on 1, 2, 3 ranks)."""
import json

import numpy as np
import pytest

from ringattn import layers as L
from ringattn.model import BlockwiseTransformer, ModelConfig, init_params, param_shapes

from mpi_util import run_file

EPS = 1e-5     # central differences in float64: truncation ~EPS^2, rounding ~1e-16/EPS
TOL = 1e-6


def fd_check(loss_fn, arrays, analytic, rng, n_coords=6):
    """Central differences of loss_fn() w.r.t. sampled coordinates of each named array (perturbed in
    place) vs the analytic gradients; asserts the relative error over the sampled vector < TOL.

    Coordinates are drawn among those whose analytic gradient is at least 1e-3 of the array's
    largest: a vector of tiny entries would be judged by the differences' own rounding noise
    (about 1e-16 * loss / EPS, absolute). One more uniformly drawn coordinate is held to the same
    TOL relative to the array's largest gradient, so tiny and zero entries are still checked."""
    for name, a in arrays.items():
        g = np.abs(np.asarray(analytic[name], np.float64))
        assert g.max() > 0, f"{name}: every analytic gradient is zero, the check is vacuous"
        big = np.flatnonzero(g >= 1e-3 * g.max())
        flat = [int(i) for i in rng.choice(big, size=min(n_coords, big.size), replace=False)]
        fd, an = [], []
        for i in flat + [int(rng.integers(a.size))]:
            idx = np.unravel_index(i, a.shape)
            old = a[idx]
            a[idx] = old + EPS
            lp = loss_fn()
            a[idx] = old - EPS
            lm = loss_fn()
            a[idx] = old
            fd.append((lp - lm) / (2 * EPS))
            an.append(analytic[name][idx])
        fd, an = np.array(fd), np.array(an)
        err = np.linalg.norm(fd[:-1] - an[:-1]) / np.linalg.norm(fd[:-1])
        assert err < TOL, f"{name}: finite-difference rel error {err:.2e} (fd {fd[:-1]}, analytic {an[:-1]})"
        extra = abs(fd[-1] - an[-1]) / g.max()
        assert extra < TOL, f"{name}: uniformly drawn coordinate off by {extra:.2e} of the largest gradient"


def check_layer(layer, p, x, rng, extra=(), dx_expected=True):
    """Loss = sum(forward(p, x) * R) for a fixed random R; check dx and every parameter."""
    out, cache = layer.forward(p, x, *extra)
    R = rng.standard_normal(out.shape)
    dx, grads = layer.backward(R, cache)

    def loss():
        return float((layer.forward(p, x, *extra)[0] * R).sum())

    arrays = dict(p)
    analytic = dict(grads)
    if dx_expected:
        arrays["x"], analytic["x"] = x, dx
    fd_check(loss, arrays, analytic, rng)


@pytest.fixture
def rng():
    return np.random.default_rng()


def test_linear_and_input_projection(rng):
    for layer in (L.Linear(), L.InputProjection()):
        p = {"w": rng.standard_normal((5, 7)), "b": rng.standard_normal(7)}
        check_layer(layer, p, rng.standard_normal((2, 3, 5)), rng)


def test_layernorm(rng):
    p = {"g": rng.standard_normal(9), "b": rng.standard_normal(9)}
    check_layer(L.LayerNorm(), p, rng.standard_normal((3, 4, 9)) * 2 + 1, rng)


def test_layernorm_fused_residual_adds(rng):
    """add=: x += add in place, then LN of the sum; residual=: residual += dx in place, returned."""
    ln, w = L.LayerNorm(), 9
    p = {"g": rng.standard_normal(w), "b": rng.standard_normal(w)}
    x, a, dy = (rng.standard_normal((3, 4, w)) for _ in range(3))
    y_ref, c_ref = ln.forward(p, x + a)
    xs = x.copy()
    y, c = ln.forward(p, xs, add=a)
    assert np.allclose(xs, x + a, rtol=0, atol=0) and np.allclose(y, y_ref, rtol=1e-14, atol=1e-14)
    dx_ref, g_ref = ln.backward(dy, c_ref)
    r = rng.standard_normal(x.shape)
    r0 = r.copy()
    out, g = ln.backward(dy, c, residual=r)
    assert np.shares_memory(out, r)
    np.testing.assert_allclose(r, r0 + dx_ref, rtol=1e-13, atol=1e-13)
    for k in g_ref:
        np.testing.assert_allclose(g[k], g_ref[k], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="C-contiguous"):
        ln.forward(p, np.asfortranarray(x), add=a)


def test_embedding_repeated_ids(rng):
    p = {"w": rng.standard_normal((6, 4))}
    ids = rng.integers(0, 6, size=(3, 11))  # 33 ids over 6 rows: repeats are accumulated
    check_layer(L.Embedding(), p, ids, rng, dx_expected=False)
    with pytest.raises(ValueError, match="token ids"):
        L.Embedding().forward(p, np.array([[0, 6]]))


def rope_reference(x, positions, base=10000.0):
    """float64 RoPE of x (batch, seq, heads, dim), half-split pairs (x[i], x[i + dim/2]), written out."""
    d = x.shape[-1]
    ang = np.asarray(positions, np.float64)[:, None] * base ** (-2.0 * np.arange(d // 2) / d)
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (2, 1)])
def test_rope_in_place_on_qkv(rng, heads, kv_heads):
    rope = L.Rope()
    d, s = 6, 7
    pos = rng.permutation(1000)[:s]  # arbitrary global positions (as under zigzag / striped)
    tables = rope.tables(pos, d, np.float64)
    nh = heads + 2 * kv_heads
    x = rng.standard_normal((2, s, nh * d))
    y = L.Rope.forward(x.copy(), tables, heads, kv_heads, d)
    planes = y.reshape(2, s, nh, d)
    ref = rope_reference(x.reshape(2, s, nh, d)[:, :, : heads + kv_heads], pos)
    assert np.linalg.norm(planes[:, :, : heads + kv_heads] - ref) < 1e-14 * np.linalg.norm(ref)
    assert np.array_equal(planes[:, :, heads + kv_heads :], x.reshape(2, s, nh, d)[:, :, heads + kv_heads :])
    back = L.Rope.backward(y.copy(), tables, heads, kv_heads, d)  # the inverse rotation undoes it
    assert np.linalg.norm(back - x) < 1e-14 * np.linalg.norm(x)

    class Layer:  # out-of-place wrapper for the finite-difference check of forward/backward
        forward = staticmethod(lambda p, a: (L.Rope.forward(a.copy(), tables, heads, kv_heads, d), None))
        backward = staticmethod(lambda dy, c: (L.Rope.backward(dy.copy(), tables, heads, kv_heads, d), {}))

    check_layer(Layer(), {}, x, rng)
    # dot products of rotated vectors depend only on position differences
    t1, t2 = rope.tables(np.array([3, 10]), d, np.float64), rope.tables(np.array([103, 110]), d, np.float64)
    qk = np.broadcast_to(rng.standard_normal((1, 1, nh * d)), (1, 2, nh * d)).copy()
    a = L.Rope.forward(qk.copy(), t1, heads, kv_heads, d).reshape(2, nh, d)
    b = L.Rope.forward(qk.copy(), t2, heads, kv_heads, d).reshape(2, nh, d)
    assert abs((a[0, 0] * a[1, heads]).sum() - (b[0, 0] * b[1, heads]).sum()) < 1e-12
    with pytest.raises(ValueError, match="even"):
        rope.tables(pos, 5, np.float64)


@pytest.mark.parametrize("causal,heads,kv_heads", [(False, 2, 2), (True, 2, 2), (True, 4, 2), (False, 3, 1)])
def test_attention(rng, causal, heads, kv_heads):
    d, width, s = 4, 6, 9
    att = L.Attention(heads, d, L.LocalAttention(), causal=causal, kv_heads=kv_heads)
    nqkv = (heads + 2 * kv_heads) * d
    p = {"wqkv": rng.standard_normal((width, nqkv)) * 0.5, "bqkv": rng.standard_normal(nqkv) * 0.1,
         "wo": rng.standard_normal((heads * d, width)) * 0.5, "bo": rng.standard_normal(width)}
    tables = L.Rope().tables(np.arange(s) + 5, d, np.float64)
    check_layer(att, p, rng.standard_normal((2, s, width)), rng, extra=(tables,))


def test_feedforward_chunked(rng):
    w = 5
    p = {"w1": rng.standard_normal((w, 4 * w)) * 0.5, "b1": rng.standard_normal(4 * w) * 0.1,
         "w2": rng.standard_normal((4 * w, w)) * 0.5, "b2": rng.standard_normal(w)}
    for chunk in (1, 3, 64):  # 2 x 7 = 14 tokens: uneven last chunk, one chunk bigger than all tokens
        check_layer(L.FeedForward(chunk), p, rng.standard_normal((2, 7, w)), rng)


def test_cls_head(rng):
    p = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
    h = rng.standard_normal((5, 6, 4))
    y = rng.integers(0, 3, 5)
    head = L.MeanPoolClassifier()
    loss, cache, stats = head.forward(p, h, y, h.shape[1])
    dh, g = head.backward(cache)
    fd_check(lambda: head.forward(p, h, y, h.shape[1])[0], {**p, "h": h}, {**g, "h": dh}, rng)
    logits = h.mean(axis=1) @ p["w"] + p["b"]
    ref = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(5), y])
    assert abs(loss - ref) < 1e-12 * abs(ref)
    assert stats == {"correct": int((logits.argmax(1) == y).sum()), "count": 5}


def test_lm_head_ignores_unlabelled(rng):
    p = {"w": rng.standard_normal((4, 7)), "b": rng.standard_normal(7)}
    h = rng.standard_normal((3, 5, 4))
    y = np.where(rng.random((3, 5)) < 0.5, rng.integers(0, 7, (3, 5)), -1)
    y[0, 0] = 2  # at least one label
    head = L.TokenClassifier()
    loss, cache, stats = head.forward(p, h, y)
    dh, g = head.backward(cache)
    # ~half the rows of h are unlabelled (zero gradient): 20 samples so that some land on labelled
    # rows (with 6, all missed them about once in 60 runs)
    fd_check(lambda: head.forward(p, h, y)[0], {**p, "h": h}, {**g, "h": dh}, rng, n_coords=20)
    assert np.all(dh[y < 0] == 0)
    z = h @ p["w"] + p["b"]
    ce = np.log(np.exp(z).sum(-1)) - np.take_along_axis(z, np.maximum(y, 0)[..., None], -1)[..., 0]
    ref = ce[y >= 0].mean()
    assert abs(loss - ref) < 1e-12 * abs(ref)
    assert stats["count"] == int((y >= 0).sum())


MODEL_CASES = {
    "lm_tokens_causal": dict(cfg=dict(vocab=13, width=8, layers=2, heads=2, causal=True, head="lm", n_classes=5,
                                      ffn_chunk=4)),
    "cls_real_gqa": dict(cfg=dict(input="real", in_features=3, width=8, layers=2, heads=4, kv_heads=2,
                                  causal=False, head="cls", n_classes=3, ffn_chunk=5)),
}


def make_case(name, batch, seq, seed, last_only=False):
    """float64 config, perturbed params, inputs, labels; last_only: 'lm' labels only on the last
    token (as in needle: most ranks then hold no labelled token)."""
    cfg = ModelConfig(dtype="float64", **MODEL_CASES[name]["cfg"])
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed)
    for k in params:  # move LN/biases off their init so every term of the gradient is exercised
        params[k] = params[k] + 0.1 * rng.standard_normal(params[k].shape)
    if cfg.input == "tokens":
        x = rng.integers(0, cfg.vocab, (batch, seq))
    else:
        x = rng.standard_normal((batch, seq, cfg.in_features))
    if cfg.head == "lm":
        y = np.where(rng.random((batch, seq)) < 0.4, rng.integers(0, cfg.n_classes, (batch, seq)), -1)
        y[:, -1] = rng.integers(0, cfg.n_classes, batch)
        if last_only:
            y[:, :-1] = -1
    else:
        y = rng.integers(0, cfg.n_classes, batch)
    return cfg, params, x, y


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_whole_model_gradients(case, rng):
    cfg, params, x, y = make_case(case, 2, 11, int(rng.integers(1 << 30)))
    model = BlockwiseTransformer(cfg, L.LocalAttention())
    pos = np.arange(x.shape[1])
    loss, grads, stats = model.loss_and_grads(params, x, pos, y)
    assert set(grads) == set(params) and all(grads[k].shape == params[k].shape for k in params)
    assert np.isfinite(loss) and stats["count"] > 0
    assert model.evaluate(params, x, pos, y)[0] == loss
    fd_check(lambda: model.evaluate(params, x, pos, y)[0], params, grads, rng, n_coords=3)


def flat_views(params, fill=np.nan):
    """(flat buffer filled with `fill`, name -> view of it shaped like the parameter), as the trainer's."""
    flat = np.full(sum(a.size for a in params.values()), fill, dtype=next(iter(params.values())).dtype)
    views, o = {}, 0
    for k, a in params.items():
        views[k] = flat[o:o + a.size].reshape(a.shape)
        o += a.size
    return flat, views


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_grads_written_into_given_arrays_and_buffers_reused(case, rng):
    cfg, params, x, y = make_case(case, 2, 11, int(rng.integers(1 << 30)))
    model = BlockwiseTransformer(cfg, L.LocalAttention())
    pos = np.arange(x.shape[1])
    loss, fresh, stats = model.loss_and_grads(params, x, pos, y)
    kept = {k: v.copy() for k, v in fresh.items()}
    store = dict(model.workspace._store)
    assert store, "the step keeps no workspace"
    flat, views = flat_views(params)  # NaN-poisoned: an unwritten gradient element fails below
    loss2, out, stats2 = model.loss_and_grads(params, x, pos, y, grads=views)
    assert out is views and loss2 == loss and stats2 == stats
    assert not np.isnan(flat).any()
    for k in params:
        assert np.array_equal(views[k], fresh[k]), k
        assert np.array_equal(fresh[k], kept[k]), k  # grads=None arrays are the caller's: not reused
    # the second step reused every buffer of the first (same shapes: nothing new allocated)
    assert all(model.workspace._store[k] is v for k, v in store.items()) and len(model.workspace._store) == len(store)
    flat[:] = np.nan
    assert model.loss_and_grads(params, x, pos, y, grads=views)[0] == loss
    assert all(np.array_equal(views[k], fresh[k]) for k in params)
    # a new shape (another batch) gets new buffers and still the right gradients
    x3, y3 = x[:1], y[:1]
    l3, g3, _ = model.loss_and_grads(params, x3, pos, y3)
    l3_ref, g3_ref, _ = BlockwiseTransformer(cfg, L.LocalAttention()).loss_and_grads(params, x3, pos, y3)
    assert l3 == l3_ref and all(np.array_equal(g3[k], g3_ref[k]) for k in params)
    # two models sharing one workspace, called in turn: each call still gets its own results
    other = BlockwiseTransformer(cfg, L.LocalAttention(), workspace=model.workspace)
    assert other.loss_and_grads(params, x3, pos, y3)[0] == l3 and model.loss_and_grads(params, x, pos, y)[0] == loss


def test_grads_argument_errors():
    cfg, params, x, y = make_case("lm_tokens_causal", 1, 5, 0)
    model = BlockwiseTransformer(cfg, L.LocalAttention())
    _, views = flat_views(params)
    with pytest.raises(ValueError, match=r"missing \['head.b'\]"):
        model.loss_and_grads(params, x, np.arange(5), y, grads={k: v for k, v in views.items() if k != "head.b"})
    bad = dict(views, **{"ln_f.g": np.zeros(3)})
    with pytest.raises(ValueError, match=r"grads\['ln_f.g'\]: expected shape \(8,\)"):
        model.loss_and_grads(params, x, np.arange(5), y, grads=bad)
    bad = dict(views, **{"ln_f.g": np.zeros(8, np.float32)})
    with pytest.raises(ValueError, match="dtype float64"):
        model.loss_and_grads(params, x, np.arange(5), y, grads=bad)


def test_init_deterministic_and_config_errors():
    cfg = ModelConfig(vocab=10, width=8, layers=1, heads=2)
    a, b, c = init_params(cfg, 3), init_params(cfg, 3), init_params(cfg, 4)
    assert list(a) == list(param_shapes(cfg))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embed.w"], c["embed.w"])
    assert a["embed.w"].dtype == np.float32 and abs(a["embed.w"].std() - cfg.embed_std) < 0.3 * cfg.embed_std
    w = a["blocks.0.ffn.w1"]
    assert abs(w.std() - cfg.init_std) < 0.3 * cfg.init_std
    with pytest.raises(ValueError, match="multiple of heads"):
        ModelConfig(width=10, heads=3)
    with pytest.raises(ValueError, match="head must be"):
        ModelConfig(head="mlm")
    with pytest.raises(ValueError, match="positions"):
        BlockwiseTransformer(cfg, L.LocalAttention()).evaluate(a, np.zeros((1, 4), int), np.arange(3),
                                                               -np.ones((1, 4), int))


@pytest.mark.parametrize("nranks", [1, 2, 3, 4])
def test_sequence_parallel_exact(nranks):
    pytest.importorskip("ringattn.ring")
    res = run_file(nranks, "model_sequence_parallel.py", timeout=120)
    line = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, res.stdout + res.stderr
    out = json.loads(line[0][7:])
    assert len(out) == 4
    for key, r in out.items():
        assert r["loss"] < 1e-6, (key, r)
        assert r["grads"] < 1e-6, (key, r)
        assert r["stats_equal"], (key, r)


def test_float32_stays_float32_and_for_task():
    cfg = ModelConfig.for_task("needle", width=8, layers=1, heads=2)
    assert (cfg.vocab, cfg.n_classes, cfg.head, cfg.causal) == (224, 32, "lm", True)
    params = init_params(cfg, 0)
    rng = np.random.default_rng()
    x = rng.integers(0, cfg.vocab, (2, 10))
    y = np.full((2, 10), -1)
    y[:, -1] = rng.integers(0, 32, 2)
    loss, grads, stats = BlockwiseTransformer(cfg, L.LocalAttention()).loss_and_grads(params, x, np.arange(10), y)
    assert type(loss) is float and stats["count"] == 2
    assert {g.dtype for g in grads.values()} == {np.dtype(np.float32)}
    cfg = ModelConfig.for_task("synthetic", in_features=3, width=8, layers=1, heads=2)
    assert (cfg.input, cfg.in_features, cfg.head, cfg.causal) == ("real", 3, "cls", False)
