"""needle: long-context associative recall, the trainer's main task.

Vocabulary: keys [0, 64), values [64, 96), filler [96, 224). A sequence holds 4 (key, value)
pairs with distinct keys and distinct values, each pair two adjacent tokens, scattered at random
through random filler; the LAST token repeats one of the 4 keys (the query). Labels (batch, seq):
-1 everywhere except the last position, which holds the queried key's value index in [0, 32)
('lm' head, 32 classes, causal). Longer sequences = more filler between the pairs and the query.

What a bag of tokens gives: the 4 values present are visible to a bag model, but not which one
belongs to the queried key, so its best accuracy is 1/4 (chance over all values is 1/32);
bag_baseline() trains the mean-pooled-embedding baseline to show it.
"""
import numpy as np

from ..data import rng_for
from .task import Task, register

N_KEYS, N_VALUES, N_FILLER, N_PAIRS = 64, 32, 128, 4
KEY0, VALUE0, FILLER0 = 0, N_KEYS, N_KEYS + N_VALUES
VOCAB = N_KEYS + N_VALUES + N_FILLER
MIN_LEN = 2 * N_PAIRS + 1
# Stages not shorter than the final --seq-len are dropped: the 2048-token main job ends 512 -> 2048,
# longer runs learn at 2048 (4x cheaper per step than 4096, 16 sequences either way) before their final length.
DEFAULT_CURRICULUM = "12:1024,32:512,128:128,512:32,2048:16"


def _first_k_of_permutation(rng, rows, n, k):
    """k distinct values from range(n) per row, in random order: (rows, k)."""
    return np.argsort(rng.random((rows, n)), axis=1)[:, :k]


def needle_batch(batch, seq_len, seed=0, step=0, split="train"):
    """x (batch, seq_len) int32 tokens, labels (batch, seq_len) int64 (-1 except the last column)."""
    if seq_len < MIN_LEN:
        raise ValueError(f"needle needs seq_len >= {MIN_LEN} (4 pairs + query), got {seq_len}")
    rng = rng_for(seed, split, step)
    b, L = int(batch), int(seq_len)
    keys = KEY0 + _first_k_of_permutation(rng, b, N_KEYS, N_PAIRS)
    vals = _first_k_of_permutation(rng, b, N_VALUES, N_PAIRS)          # value indices (the classes)
    x = (FILLER0 + rng.integers(0, N_FILLER, size=(b, L))).astype(np.int32)
    # Place the pairs: among F filler tokens + 4 pair items (F + 4 slots before the query), pick 4
    # slots; pair i (in slot order) starts at slot + i because each earlier pair takes one extra token.
    n_fill = L - 1 - 2 * N_PAIRS
    slots = np.sort(_first_k_of_permutation(rng, b, n_fill + N_PAIRS, N_PAIRS), axis=1)
    start = slots + np.arange(N_PAIRS)
    rows = np.arange(b)[:, None]
    x[rows, start] = keys
    x[rows, start + 1] = VALUE0 + vals
    q = rng.integers(0, N_PAIRS, size=b)
    x[:, L - 1] = keys[np.arange(b), q]
    labels = np.full((b, L), -1, dtype=np.int64)
    labels[:, L - 1] = vals[np.arange(b), q]
    return x, labels


@register
class Needle(Task):
    name = "needle"
    order = 0
    help = "associative recall: the value of the key the last token repeats, among filler"
    head, causal, input, vocab, n_classes = "lm", True, "tokens", VOCAB, N_VALUES
    seq_len = 2048
    curriculum = DEFAULT_CURRICULUM
    # The recall needs one long-range layer: the first finds each value's key right before it, which
    # a local window covers at a sliver of full attention's cost (docs/training.md, "Defaults").
    local_window = 8
    # The lr decays once the final length is reached, instead of over the whole 3000-step budget: the
    # run stops at the target long before that budget is spent (docs/training.md, "Defaults").
    decay_steps = 400
    def __init__(self, args):
        super().__init__(args)
        if args.seq_len < MIN_LEN:
            raise ValueError(f"needle needs --seq-len >= {MIN_LEN}, got {args.seq_len}")

    def batch(self, step, seq_len, batch, split="train"):
        return needle_batch(batch, seq_len, self.seed, step, split)


def bag_baseline(seq_len=64, steps=400, batch=512, width=64, lr=1e-2, seed=0, n_eval=4000):
    """Train the no-attention baseline on needle and return its held-out accuracy.

    Model: mean of learned token embeddings over the whole sequence -> linear head over the 32
    values (softmax CE), full-batch Adam in NumPy. Returns dict(accuracy, chance=1/32,
    bag_bound=1/4, n_eval): a bag of tokens can at best pick one of the 4 values present.

        python -c "from ringattn.tasks.needle import bag_baseline as b; print(b(seq_len=2048))"
    """
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, width)) * 0.1
    w = rng.standard_normal((width, N_VALUES)) * 0.1
    bias = np.zeros(N_VALUES)
    params = [emb, w, bias]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]

    def bag(x):  # (b, V) token frequencies: the mean of one-hot rows
        b = x.shape[0]
        c = np.bincount((x + VOCAB * np.arange(b)[:, None]).ravel(), minlength=b * VOCAB)
        return c.reshape(b, VOCAB) / x.shape[1]

    for t in range(1, steps + 1):
        x, y = needle_batch(batch, seq_len, seed=seed, step=t, split="train")
        y = y[:, -1]
        c = bag(x)
        pooled = c @ emb
        z = pooled @ w + bias
        z -= z.max(axis=1, keepdims=True)
        pr = np.exp(z)
        pr /= pr.sum(axis=1, keepdims=True)
        pr[np.arange(batch), y] -= 1.0
        dz = pr / batch
        dw = pooled.T @ dz
        grads = [c.T @ (dz @ w.T), dw, dz.sum(axis=0)]
        for p, g, mi, vi in zip(params, grads, m, v):
            mi *= 0.9
            mi += 0.1 * g
            vi *= 0.999
            vi += 0.001 * g * g
            p -= lr * (mi / (1 - 0.9 ** t)) / (np.sqrt(vi / (1 - 0.999 ** t)) + 1e-8)
    x, y = needle_batch(n_eval, seq_len, seed=seed, step=0, split="eval")
    pred = (bag(x) @ emb @ w + bias).argmax(axis=1)
    return dict(accuracy=float((pred == y[:, -1]).mean()), chance=1.0 / N_VALUES, bag_bound=1.0 / N_PAIRS,
                n_eval=int(n_eval))
