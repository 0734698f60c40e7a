"""Data shared by the training tasks (tasks/): the per-batch random streams and Keras-format files.

    rng = rng_for(seed, "train", step)                        # the Generator of one batch
    ds = load_keras_text("data/imdb.npz", "imdb", 200, 20000, 2)
    x, y = text_batch(ds, batch=32, seed=0, step=7, split="train")

Randomness: each batch comes from numpy Generator(SeedSequence([seed, split_id, step])), so a
batch depends only on (seed, split, step), on every rank and after a resume. The 'eval' split
uses a different stream (split_id 1) from 'train' (split_id 0): a held-out set.

Keras-format npz files (x_train, y_train, x_test, y_test; x as object arrays of word-index
lists) are read without unpickling anything but lists of ints. Token ids as Keras' loaders make
them: 1 = start, 2 = out of vocabulary (ids >= the vocab cap), word rank w -> w + 3; then padded
with 0 / truncated at the FRONT to seq_len (Keras pad_sequences defaults).
"""
import io
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np

SPLITS = {"train": 0, "eval": 1}

# Keras text conventions
PAD, START, OOV, INDEX_FROM = 0, 1, 2, 3
KERAS_KEYS = ("x_train", "y_train", "x_test", "y_test")


def rng_for(seed, split, step):
    """The Generator of one batch: depends only on (seed, split, step)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return np.random.default_rng([int(seed), SPLITS[split], int(step)])


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


def load_keras_text(path, name, seq_len, vocab, n_classes):
    """Load a Keras-format file (imdb.npz, reuters.npz) from a local path. No downloads, ever."""
    seq_len, vocab = int(seq_len), int(vocab)
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
        if ys.min() < 0 or ys.max() >= n_classes:
            raise _malformed(path, f"y_{split} labels must be in [0, {n_classes}) for {name}, got range "
                                   f"[{ys.min()}, {ys.max()}]")
        parts[split] = (encode_keras_sequences(xs, seq_len, vocab, path, f"x_{split}"), ys.astype(np.int64))
    return TextDataset(name, parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1],
                       n_classes, vocab)


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


# ---- kept for bench/train.py (not a task's home: tasks/ is) ---------------------------------

def task_info(task, in_features=8):
    """Model-facing facts of a registered task (tasks.get(task).info)."""
    from . import tasks
    return tasks.get(task).info(in_features=in_features)


def get_batch(task, batch, seq_len, seed=0, step=0, split="train", in_features=8):
    """Full-sequence (x, labels) of a task that needs no data file."""
    from types import SimpleNamespace

    from . import tasks
    args = SimpleNamespace(seed=seed, seq_len=seq_len, data=None, in_features=in_features, train_size=0)
    return tasks.get(task)(args).batch(step, seq_len, batch, split)
