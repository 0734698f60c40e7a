"""Deterministic data for the training tasks. Every batch is a FULL-sequence batch; the trainer
shards it with ring.shard(x, axis=1) (and ring.shard(labels, axis=1) for the 'lm' head).

    info = task_info("needle")                   # head, causal, input kind, vocab, n_classes
    x, y = get_batch("needle", batch=32, seq_len=512, seed=0, step=7, split="train")
    ds = load_keras_text("data/imdb.npz", "imdb")  # then get_batch("imdb", ..., dataset=ds)

Randomness: each batch comes from numpy Generator(SeedSequence([seed, split_id, step])), so a
batch depends only on (seed, split, step), on every rank and after a resume. The 'eval' split
uses a different stream (split_id 1) from 'train' (split_id 0): a held-out set.

Tasks
- needle: long-context associative recall. Vocabulary: keys [0, 64), values [64, 96), filler
  [96, 224). A sequence holds 4 (key, value) pairs with distinct keys and distinct values, each
  pair two adjacent tokens, scattered at random through random filler; the LAST token repeats
  one of the 4 keys (the query). Labels (batch, seq): -1 everywhere except the last position,
  which holds the queried key's value index in [0, 32) ('lm' head, 32 classes, causal). Longer
  sequences = more filler between the pairs and the query = harder.
  What the bag of tokens gives: the 4 values present are visible to a bag model, but not which one
  belongs to the queried key, so the best bag-of-tokens accuracy is 1/4 (chance over all values is
  1/32); needle_bag_baseline() trains the mean-pooled-embedding baseline to show it.
- synthetic: x ~ N(0, 1) of shape (batch, seq, in_features) float32, label = (sum of x > 0), 'cls'.
- imdb / reuters: Keras-format npz files (x_train, y_train, x_test, y_test; x as object arrays
  of word-index lists). Token ids as Keras' loaders make them: 1 = start, 2 = out of vocabulary
  (ids >= the vocab cap), word rank w -> w + 3; then padded with 0 / truncated at the FRONT to
  seq_len (Keras pad_sequences defaults). imdb: 200 tokens, 2 classes; reuters: 2400, 46.
"""
import io
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

SPLITS = {"train": 0, "eval": 1}

# needle vocabulary layout
N_KEYS, N_VALUES, N_FILLER, N_PAIRS = 64, 32, 128, 4
KEY0, VALUE0, FILLER0 = 0, N_KEYS, N_KEYS + N_VALUES
NEEDLE_VOCAB = N_KEYS + N_VALUES + N_FILLER
NEEDLE_MIN_LEN = 2 * N_PAIRS + 1

# Keras text conventions
PAD, START, OOV, INDEX_FROM = 0, 1, 2, 3
TEXT_TASKS = {"imdb": dict(seq_len=200, n_classes=2, vocab=20000),
              "reuters": dict(seq_len=2400, n_classes=46, vocab=10000)}
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def task_info(task, in_features=8):
    """Model-facing facts of a task: head, causal, input kind, vocab, n_classes, default seq_len."""
    if task == "needle":
        return dict(head="lm", causal=True, input="tokens", vocab=NEEDLE_VOCAB, n_classes=N_VALUES, seq_len=2048)
    if task == "synthetic":
        return dict(head="cls", causal=False, input="real", in_features=in_features, vocab=1, n_classes=2,
                    seq_len=1024)
    if task in TEXT_TASKS:
        t = TEXT_TASKS[task]
        return dict(head="cls", causal=False, input="tokens", vocab=t["vocab"], n_classes=t["n_classes"],
                    seq_len=t["seq_len"])
    raise ValueError(f"unknown task {task!r}: expected needle, synthetic, imdb or reuters")


def rng_for(seed, split, step):
    """The Generator of one batch: depends only on (seed, split, step)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return np.random.default_rng([int(seed), SPLITS[split], int(step)])


# ---- needle ---------------------------------------------------------------------------------------

def _first_k_of_permutation(rng, rows, n, k):
    """k distinct values from range(n) per row, in random order: (rows, k)."""
    return np.argsort(rng.random((rows, n)), axis=1)[:, :k]


def needle_batch(batch, seq_len, seed=0, step=0, split="train"):
    """x (batch, seq_len) int32 tokens, labels (batch, seq_len) int64 (-1 except the last column)."""
    if seq_len < NEEDLE_MIN_LEN:
        raise ValueError(f"needle needs seq_len >= {NEEDLE_MIN_LEN} (4 pairs + query), got {seq_len}")
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


def needle_bag_baseline(seq_len=64, steps=400, batch=512, width=64, lr=1e-2, seed=0, n_eval=4000):
    """Train the no-attention baseline on needle and return its held-out accuracy.

    Model: mean of learned token embeddings over the whole sequence -> linear head over the 32
    values (softmax CE), full-batch Adam in NumPy. Returns dict(accuracy, chance=1/32,
    bag_bound=1/4, n_eval): a bag of tokens can at best pick one of the 4 values present.
    """
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((NEEDLE_VOCAB, width)) * 0.1
    w = rng.standard_normal((width, N_VALUES)) * 0.1
    bias = np.zeros(N_VALUES)
    params = [emb, w, bias]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]

    def bag(x):  # (b, V) token frequencies: the mean of one-hot rows
        b = x.shape[0]
        c = np.bincount((x + NEEDLE_VOCAB * np.arange(b)[:, None]).ravel(), minlength=b * NEEDLE_VOCAB)
        return c.reshape(b, NEEDLE_VOCAB) / x.shape[1]

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


# ---- synthetic ------------------------------------------------------------------------------------

def synthetic_batch(batch, seq_len, in_features=8, seed=0, step=0, split="train"):
    """x (batch, seq_len, in_features) float32 ~ N(0, 1); labels (batch,) int64 = (sum of x > 0)."""
    rng = rng_for(seed, split, step)
    x = rng.standard_normal((batch, seq_len, in_features)).astype(np.float32)
    return x, (x.astype(np.float64).sum(axis=(1, 2)) > 0).astype(np.int64)


# ---- Keras-format text (imdb, reuters) ------------------------------------------------------------

@dataclass
class TextDataset:
    name: str
    x_train: np.ndarray   # (n_train, seq_len) int32
    y_train: np.ndarray   # (n_train,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    vocab: int


def _malformed(path, msg):
    return ValueError(f"{path}: malformed Keras-format dataset: {msg}. Expected an .npz with arrays "
                      f"{', '.join(KERAS_KEYS)} (x_*: sequences of word indices, y_*: integer labels).")


class UnsafeDataError(ValueError):
    """A data file whose pickled arrays ask for anything beyond plain lists, ints and NumPy arrays."""


def _numpy_reconstruct():
    try:
        from numpy._core import multiarray  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct


class _ObjectArrayUnpickler(pickle.Unpickler):
    """Unpickles a NumPy object array of Python lists/ints/strings and nothing else.

    Lists, ints and strings are plain pickle opcodes; the only globals such a pickle names are
    the array reconstructor, ndarray and dtype (under NumPy 1's or 2's module names). Every other
    global (os.system, builtins.eval, ...) is how a crafted file would run code, so it is refused.
    """
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def __init__(self, fp, where):
        super().__init__(fp, encoding="ASCII", fix_imports=True)
        self.where = where

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise UnsafeDataError(f"{self.where}: refused to load: its pickled data asks for {module}.{name}, "
                                  f"which a Keras dataset never needs (only lists of ints in NumPy arrays); "
                                  f"the file was not written by NumPy/Keras or was crafted to run code")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return getattr(np, name)

    def persistent_load(self, pid):
        raise UnsafeDataError(f"{self.where}: refused to load: persistent pickle ids are not array data")


def _read_npy(data, where):
    """One .npy member (bytes): plain arrays without pickle; object arrays via _ObjectArrayUnpickler."""
    from numpy.lib import format as npy
    fp = io.BytesIO(data)
    try:
        version = npy.read_magic(fp)
        shape, _, dtype = (npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0)(fp)
    except (ValueError, EOFError) as e:
        raise ValueError(f"{where}: not a .npy array ({e})") from None
    if not dtype.hasobject:
        return npy.read_array(io.BytesIO(data), allow_pickle=False)
    try:
        a = _ObjectArrayUnpickler(fp, where).load()
    except UnsafeDataError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken pickle is a malformed file
        raise ValueError(f"{where}: unreadable object array ({type(e).__name__}: {e})") from None
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{where}: object array does not match its header (shape {shape}, dtype {dtype})")
    return a


def read_npz_arrays(path, keys):
    """Arrays `keys` of an .npz file, without ever running code stored in it.

    np.load(allow_pickle=True) would unpickle object arrays with the full pickle machinery, which
    runs whatever callable the file names. Here the zip members are read directly: numeric arrays
    with allow_pickle=False, object arrays (Keras' lists of word indices) through a restricted
    unpickler; anything else raises UnsafeDataError / a malformed-file ValueError naming the file.
    """
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise _malformed(path, f"cannot be read as .npz ({type(e).__name__}: {e})") from None
    with z:
        names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
        missing = [k for k in keys if k not in names]
        if missing:
            raise _malformed(path, f"missing arrays {missing} (found {sorted(names)})")
        out = {}
        for k in keys:
            try:
                out[k] = _read_npy(z.read(f"{k}.npy"), f"{path} ({k})")
            except UnsafeDataError:
                raise
            except (ValueError, zipfile.BadZipFile, OSError, EOFError) as e:
                raise _malformed(path, str(e)) from None
    return out


def encode_keras_sequences(seqs, seq_len, vocab, path="<data>", key="x"):
    """Word-index lists -> (n, seq_len) int32 the way Keras loads them: [START] + (w + 3), ids >=
    vocab -> OOV, then front-padded with PAD / front-truncated to seq_len (pad_sequences defaults)."""
    out = np.zeros((len(seqs), seq_len), dtype=np.int32)
    for i, s in enumerate(seqs):
        try:
            a = np.asarray(s, dtype=np.int64).reshape(-1) if np.ndim(s) <= 1 else None
        except (TypeError, ValueError):
            a = None
        if a is None or (a.size and a.min() < 0):
            raise _malformed(path, f"{key}[{i}] is not a list of non-negative word indices")
        a = np.concatenate([[START], a + INDEX_FROM])
        a[a >= vocab] = OOV
        a = a[-seq_len:]
        out[i, seq_len - len(a):] = a
    return out


def load_keras_text(path, name, seq_len=None, vocab=None):
    """Load imdb.npz / reuters.npz (Keras format) from a local path. No downloads, ever."""
    if name not in TEXT_TASKS:
        raise ValueError(f"unknown text dataset {name!r}: expected one of {sorted(TEXT_TASKS)}")
    d = TEXT_TASKS[name]
    seq_len = d["seq_len"] if seq_len is None else int(seq_len)
    vocab = d["vocab"] if vocab is None else int(vocab)
    if vocab <= INDEX_FROM:
        raise ValueError(f"vocab cap must be > {INDEX_FROM}, got {vocab}")
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{name}: dataset file not found: {path!r}. Expected the Keras-format {name}.npz "
                                f"(arrays {', '.join(KERAS_KEYS)}); pass its path with --data. Nothing is downloaded.")
    arr = read_npz_arrays(path, KERAS_KEYS)
    parts = {}
    for split in ("train", "test"):
        xs, ys = arr[f"x_{split}"], arr[f"y_{split}"]
        if xs.ndim not in (1, 2) or len(xs) == 0:
            raise _malformed(path, f"x_{split} must be a non-empty array of sequences, got shape {xs.shape}")
        if ys.ndim != 1 or len(ys) != len(xs):
            raise _malformed(path, f"y_{split} must be 1-D with one label per sequence: shape {ys.shape} "
                                   f"for {len(xs)} sequences")
        if not np.issubdtype(ys.dtype, np.integer):
            raise _malformed(path, f"y_{split} must hold integer labels, got dtype {ys.dtype}")
        if ys.min() < 0 or ys.max() >= d["n_classes"]:
            raise _malformed(path, f"y_{split} labels must be in [0, {d['n_classes']}) for {name}, got range "
                                   f"[{ys.min()}, {ys.max()}]")
        parts[split] = (encode_keras_sequences(xs, seq_len, vocab, path, f"x_{split}"), ys.astype(np.int64))
    return TextDataset(name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                       d["n_classes"], vocab)


def text_batch(ds, batch, seed=0, step=0, split="train"):
    """Train: batch `step` of a per-epoch shuffle (seeded by (seed, epoch)); eval: the test set in
    order, batch `step` (wrapping). Returns x (batch, seq_len) int32, labels (batch,) int64."""
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    n = len(x)
    if split == "train":
        per_epoch = max(n // batch, 1)
        epoch, k = divmod(int(step), per_epoch)
        perm = np.random.default_rng([int(seed), SPLITS["train"], 1 << 30, epoch]).permutation(n)
        idx = perm[(k * batch + np.arange(batch)) % n]
    else:
        rng_for(seed, split, step)  # validates split
        idx = (int(step) * batch + np.arange(batch)) % n
    return x[idx], y[idx]


def write_fake_keras_npz(path, name="imdb", n_train=64, n_test=32, max_words=300, max_len=50, seed=0):
    """Write a small file in the Keras format (object arrays of word-index lists) for tests."""
    n_classes = TEXT_TASKS[name]["n_classes"]
    rng = np.random.default_rng(seed)

    def seqs(n):
        a = np.empty(n, dtype=object)
        for i in range(n):
            a[i] = [int(w) for w in rng.integers(1, max_words, size=rng.integers(1, max_len + 1))]
        return a

    np.savez(path, x_train=seqs(n_train), y_train=rng.integers(0, n_classes, n_train),
             x_test=seqs(n_test), y_test=rng.integers(0, n_classes, n_test))
    return path


# ---- one entry point for the trainer ---------------------------------------------------------------

def get_batch(task, batch, seq_len, seed=0, step=0, split="train", dataset=None, in_features=8):
    """Full-sequence (x, labels) for any task; text tasks need `dataset` (load_keras_text)."""
    if task == "needle":
        return needle_batch(batch, seq_len, seed, step, split)
    if task == "synthetic":
        return synthetic_batch(batch, seq_len, in_features, seed, step, split)
    if task in TEXT_TASKS:
        if dataset is None:
            raise ValueError(f"task {task!r} needs a dataset: load_keras_text(path, {task!r})")
        if dataset.x_train.shape[1] != seq_len:
            raise ValueError(f"{task}: dataset was padded to {dataset.x_train.shape[1]} tokens, asked for {seq_len}")
        return text_batch(dataset, batch, seed, step, split)
    task_info(task)  # raises the unknown-task error
