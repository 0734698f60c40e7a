"""The model's sliding window (ModelConfig.window, `ringattn train --window LEFT`) and its local layers
(ModelConfig.local_window, `--local-window W`): the windowed model's forward equals one built on a
naive float64 attention with the window mask (per layer for local layers), its gradients match its
own loss, and a 2-rank ring run trains with it; a checkpoint from another window is refused."""
import json

import numpy as np
import pytest

from mpi_util import run_mpi
from ringattn import layers as L
from ringattn.model import BlockwiseTransformer, ModelConfig, init_params


class NaiveMaskedAttention:
    """Float64 attention written out here, with the window as an explicit (i, j) mask: query i sees key
    j iff i - left <= j <= i + right (causal: right = 0). Forward only (lse unused by evaluate)."""

    def __init__(self, left, right):
        self.left, self.right = left, right

    def attention_forward(self, q, k, v, causal=False, window_size=None):
        b, s, h, d = q.shape
        k, v = (np.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
        i, j = np.arange(s)[:, None], np.arange(s)[None, :]
        keep = (j >= i - self.left) & (j <= i + (0 if causal else self.right))
        scores = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(d)
        scores = np.where(keep, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        return np.einsum("bhij,bjhd->bihd", p, v), np.zeros((b, h, s))


class NaiveLayerwise(NaiveMaskedAttention):
    """NaiveMaskedAttention whose window is windows[call index % layers] (-1: none): a forward pass
    calls attention once per layer, in layer order, so call i is layer i."""

    def __init__(self, windows):
        super().__init__(-1, -1)
        self.windows, self.calls = windows, 0

    def attention_forward(self, q, k, v, causal=False, window_size=None):
        w = self.windows[self.calls % len(self.windows)]
        self.calls += 1
        self.left = self.right = q.shape[1] if w < 0 else w
        return super().attention_forward(q, k, v, causal)


def _model(window, attn, causal=True, kv_heads=0, local_window=-1, layers=2):
    cfg = ModelConfig(vocab=11, width=16, layers=layers, heads=4, kv_heads=kv_heads, causal=causal, head="lm",
                      n_classes=11, dtype="float64", ffn_chunk=5, window=window, local_window=local_window)
    return BlockwiseTransformer(cfg, attn), init_params(cfg, seed=4)


def test_local_layers_alternate_and_the_last_is_global():
    def wins(layers, local, window=-1):
        cfg = ModelConfig(layers=layers, local_window=local, window=window)
        return [cfg.layer_window(i) for i in range(layers)]
    assert wins(1, 5) == [-1]
    assert wins(2, 5) == [5, -1]
    assert wins(3, 5) == [5, -1, -1]
    assert wins(4, 0) == [0, -1, 0, -1]
    assert wins(4, -1) == [-1] * 4
    assert wins(3, 2, window=9) == [2, 9, 9]


@pytest.mark.parametrize("layers, local, window, causal", [(2, 3, -1, True), (3, 0, -1, True), (4, 2, 6, False)])
def test_local_layers_forward_matches_naive_layerwise_reference(layers, local, window, causal):
    x, pos, lab = _batch(21, seed=layers)
    model, params = _model(window, L.LocalAttention(), causal, local_window=local, layers=layers)
    expect = [model.cfg.layer_window(i) for i in range(layers)]
    ref_model, _ = _model(window, NaiveLayerwise(expect), causal, local_window=local, layers=layers)
    loss, _ = model.evaluate(params, x, pos, lab)
    ref, _ = ref_model.evaluate(params, x, pos, lab)
    assert abs(loss - ref) <= 1e-12 * abs(ref), (loss, ref)
    # and it is neither the model without local layers nor the one with the window everywhere
    for other in ([window] * layers, [local] * layers):
        alt, _ = _model(window, NaiveLayerwise(other), causal, local_window=local, layers=layers)[0].evaluate(
            params, x, pos, lab)
        assert abs(alt - loss) > 1e-6 * abs(ref), other


def _batch(seq, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (2, seq)), np.arange(seq), rng.integers(0, 11, (2, seq))


@pytest.mark.parametrize("window, causal, kv_heads", [(3, True, 0), (0, True, 2), (5, False, 0), (40, True, 1)])
def test_windowed_model_forward_matches_naive_masked_reference(window, causal, kv_heads):
    x, pos, lab = _batch(23, seed=window)
    model, params = _model(window, L.LocalAttention(), causal, kv_heads)
    ref_model, _ = _model(window, NaiveMaskedAttention(window, window), causal, kv_heads)
    loss, _ = model.evaluate(params, x, pos, lab)
    ref, _ = ref_model.evaluate(params, x, pos, lab)
    assert abs(loss - ref) <= 1e-12 * abs(ref), (loss, ref)
    full, _ = _model(-1, L.LocalAttention(), causal, kv_heads)[0].evaluate(params, x, pos, lab)
    if window < 22:  # a window shorter than the sequence changes the model
        assert abs(full - loss) > 1e-6 * abs(ref)
    else:
        assert abs(full - loss) <= 1e-12 * abs(ref)


@pytest.mark.parametrize("window, local", [(2, -1), (-1, 1)])
def test_windowed_model_gradients_match_its_loss(window, local):
    """Directional finite difference of the windowed loss vs its analytic gradient (float64): the
    backward uses the same window per layer as the forward."""
    x, pos, lab = _batch(19, seed=1)
    model, params = _model(window, L.LocalAttention(), local_window=local)
    _, grads, _ = model.loss_and_grads(params, x, pos, lab)
    rng = np.random.default_rng(7)
    direction = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    eps = 1e-5
    lp = model.evaluate({k: v + eps * direction[k] for k, v in params.items()}, x, pos, lab)[0]
    lm = model.evaluate({k: v - eps * direction[k] for k, v in params.items()}, x, pos, lab)[0]
    numeric = (lp - lm) / (2 * eps)
    analytic = sum(float((grads[k] * direction[k]).sum()) for k in params)
    assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


def test_model_config_refuses_a_bad_window():
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="^window must be an int"):
            ModelConfig(window=bad)
        with pytest.raises(ValueError, match="^local_window must be an int"):
            ModelConfig(local_window=bad)


TINY = ["--seq-len", "40", "--width", "16", "--layers", "2", "--heads", "2", "--batch", "4", "--curriculum", "none",
        "--steps", "12", "--warmup", "2", "--lr", "1e-2", "--log-interval", "1", "--eval-size", "8",
        "--target-accuracy", "0", "--no-progress", "--min-shard", "1", "--seed", "5", "--layout", "contiguous"]


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


@pytest.mark.mpi
def test_train_with_window_on_two_ranks(tmp_path):
    out = {}
    for name, extra in (("win", ["--window", "4", "--checkpoint-dir", str(tmp_path / "ck"),
                                 "--checkpoint-interval", "6"]), ("full", [])):
        out[name] = tmp_path / f"{name}.jsonl"
        run_mpi(2, module="ringattn", args=["train", *TINY, "--metrics-out", out[name], *extra], timeout=120)
    win, full = _losses(out["win"]), _losses(out["full"])
    assert sorted(win) == list(range(1, 13))
    assert all(np.isfinite(v) for v in win.values())
    assert np.mean([win[s] for s in (10, 11, 12)]) < np.mean([win[s] for s in (1, 2, 3)])
    assert abs(win[1] - full[1]) > 1e-6 * abs(full[1])  # the window reaches the model's attention

    # a checkpoint from another window (or none) is refused, with the same error on every rank
    for other in (["--window", "5"], []):
        res = run_mpi(2, module="ringattn", args=["train", *TINY, "--checkpoint-dir", str(tmp_path / "ck"),
                                                  "--resume", *other], timeout=120, check=False)
        assert res.returncode != 0
        text = res.stdout + res.stderr
        assert "window: checkpoint 4 vs run " + ("5" if other else "None") in text, text[-2000:]


@pytest.mark.mpi
def test_train_with_local_layers_on_three_ranks_and_resume_checks_them(tmp_path):
    out = tmp_path / "local.jsonl"
    ck = str(tmp_path / "ck")
    res = run_mpi(3, module="ringattn", args=["train", *TINY, "--seq-len", "39", "--local-window", "3",
                                              "--metrics-out", out, "--checkpoint-dir", ck], timeout=120)
    assert "windows per layer 3/full" in res.stderr, res.stderr[-2000:]
    loss = _losses(out)
    assert sorted(loss) == list(range(1, 13)) and all(np.isfinite(v) for v in loss.values())
    res = run_mpi(3, module="ringattn", args=["train", *TINY, "--seq-len", "39", "--local-window", "none",
                                              "--checkpoint-dir", ck, "--resume"], timeout=120, check=False)
    assert res.returncode != 0
    assert "local_window: checkpoint 3 vs run -1" in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]
