"""Task data: needle generator (determinism, structure, held-out split, no-attention baseline),
synthetic labels (fresh and fixed-set), Keras-format text loaders and their errors, the task registry."""
import io
import math
import os
import pickle
import zipfile

import numpy as np
import pytest

from keras_fake import write_fake_keras_npz
from ringattn import data as D
from ringattn import tasks
from ringattn.tasks import needle as N
from ringattn.tasks import synthetic as S


def load(path, name, **kw):
    return tasks.get(name).load(path, **kw)


@pytest.mark.parametrize("seq_len", [9, 12, 97, 2048])
def test_needle_structure(seq_len):
    x, y = N.needle_batch(64, seq_len, seed=3, step=5)
    assert x.shape == y.shape == (64, seq_len)
    assert x.min() >= 0 and x.max() < N.VOCAB
    assert np.all(y[:, :-1] == -1) and np.all((y[:, -1] >= 0) & (y[:, -1] < N.N_VALUES))
    is_key = x < N.VALUE0
    is_val = (x >= N.VALUE0) & (x < N.FILLER0)
    for b in range(64):
        row = x[b]
        # exactly 4 key->value pairs before the query, keys distinct, values distinct
        kpos = np.nonzero(is_key[b, :-1])[0]
        assert len(kpos) == N.N_PAIRS and len(set(row[kpos])) == N.N_PAIRS
        assert np.all(is_val[b, kpos + 1]) and is_val[b].sum() == N.N_PAIRS
        assert len(set(row[kpos + 1])) == N.N_PAIRS
        # the query is one of the keys, and the label is the value that followed it
        q = row[-1]
        assert is_key[b, -1] and q in row[kpos]
        j = kpos[row[kpos] == q][0]
        assert row[j + 1] - N.VALUE0 == y[b, -1]


def test_needle_deterministic_and_splits_differ():
    a = N.needle_batch(32, 64, seed=1, step=2)
    b = N.needle_batch(32, 64, seed=1, step=2)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for other in (N.needle_batch(32, 64, seed=1, step=3), N.needle_batch(32, 64, seed=2, step=2),
                  N.needle_batch(32, 64, seed=1, step=2, split="eval")):
        assert (other[0] != a[0]).mean() > 0.5
    # held-out set: no sequence of the eval stream appears in the first train batches
    train = {r.tobytes() for s in range(20) for r in N.needle_batch(256, 12, seed=0, step=s)[0]}
    ev = N.needle_batch(1000, 12, seed=0, step=0, split="eval")[0]
    assert sum(r.tobytes() in train for r in ev) == 0


def test_needle_pair_positions_spread():
    # pairs are scattered through the whole context, not clustered at one end
    x, _ = N.needle_batch(2000, 512, seed=0, step=0)
    pos = np.nonzero(x[:, :-1] < N.VALUE0)[1]
    assert pos.min() < 20 and pos.max() > 490
    assert abs(pos.mean() - 255) < 10


def test_needle_errors():
    with pytest.raises(ValueError, match="seq_len >= 9"):
        N.needle_batch(2, 8)
    with pytest.raises(ValueError, match="split"):
        N.needle_batch(2, 20, split="test")


def test_bag_of_tokens_baseline_cannot_bind():
    """The no-attention baseline (mean-pooled embeddings + linear head) can see WHICH 4 values are in
    the sequence but not which belongs to the queried key: its held-out accuracy is capped by 1/4
    (4 sigma of sampling noise allowed), far below the >= 95% the attention model reaches."""
    r = N.bag_baseline(seq_len=64, steps=300, n_eval=4000, seed=0)
    sigma = math.sqrt(0.25 * 0.75 / r["n_eval"])
    assert r["accuracy"] < r["bag_bound"] + 4 * sigma, r
    # and it does learn what the bag offers (so the bound above is not met by a broken trainer)
    assert r["accuracy"] > 3 * r["chance"], r


def test_synthetic():
    x, y = S.synthetic_batch(50, 33, in_features=4, seed=0, step=1)
    assert x.shape == (50, 33, 4) and x.dtype == np.float32 and y.shape == (50,)
    assert np.array_equal(y, (x.astype(np.float64).sum(axis=(1, 2)) > 0).astype(int))
    assert 0.2 < y.mean() < 0.8
    x2, _ = S.synthetic_batch(50, 33, in_features=4, seed=0, step=1)
    assert np.array_equal(x, x2)


@pytest.mark.parametrize("name", ["imdb", "reuters"])
def test_keras_loader(tmp_path, name):
    path = write_fake_keras_npz(str(tmp_path / f"{name}.npz"), name, n_train=40, n_test=20, max_words=500,
                                  max_len=60, seed=1)
    raw = np.load(path, allow_pickle=True)
    ds = load(path, name, seq_len=30, vocab=100)
    assert ds.x_train.shape == (40, 30) and ds.x_test.shape == (20, 30) and ds.vocab == 100
    assert ds.n_classes == tasks.get(name).n_classes
    assert np.array_equal(ds.y_train, raw["y_train"])
    for i in range(40):
        # Keras conventions, rebuilt independently: [1] + (w + 3), >= vocab -> 2, front pad/truncate
        seq = [1] + [w + 3 if w + 3 < 100 else 2 for w in raw["x_train"][i]]
        seq = seq[-30:]
        assert list(ds.x_train[i]) == [0] * (30 - len(seq)) + seq
    x, y = D.text_batch(ds, 8, seed=0, step=3)
    assert x.shape == (8, 30) and y.shape == (8,)
    x2, _ = D.text_batch(ds, 8, seed=0, step=3)
    assert np.array_equal(x, x2)
    # one epoch of train batches visits every example once
    seen = np.concatenate([D.text_batch(ds, 8, seed=0, step=s)[0] for s in range(5)])
    assert len({r.tobytes() for r in seen}) == len({r.tobytes() for r in ds.x_train})
    xe, ye = D.text_batch(ds, 8, step=1, split="eval")
    assert np.array_equal(xe, ds.x_test[8:16]) and np.array_equal(ye, ds.y_test[8:16])


def test_keras_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imdb.npz.*x_train, y_train, x_test, y_test.*--data"):
        load(str(tmp_path / "nope.npz"), "imdb")
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="cannot be read as .npz"):
        load(str(bad), "imdb")
    p = tmp_path / "missing.npz"
    np.savez(p, x_train=np.array([[1, 2]]), y_train=np.array([0]))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test'\]"):
        load(str(p), "imdb")
    good = write_fake_keras_npz(str(tmp_path / "g.npz"), "imdb", n_train=4, n_test=3)
    f = dict(np.load(good, allow_pickle=True))
    for key, val, msg in (("y_train", np.array([0, 1, 1]), "one label per sequence"),
                          ("y_test", np.array([0, 1, 2]), r"labels must be in \[0, 2\)"),
                          ("y_test", np.array([0.0, 1.0, 0.0]), "integer labels"),
                          ("x_test", np.array([[1, 2], "ab", [3]], dtype=object), r"x_test\[1\]"),
                          ("x_train", np.array([[1, -2], [1], [2], [3]], dtype=object), r"x_train\[0\]")):
        q = tmp_path / f"bad_{key}.npz"
        np.savez(q, **{**f, key: val})
        with pytest.raises(ValueError, match=msg):
            load(str(q), "imdb")
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        load(good, "mnist")
    with pytest.raises(FileNotFoundError, match="--data"):
        D.get_batch("imdb", 2, 200)
    with pytest.raises(ValueError, match="unknown task 'cifar': expected one of needle, synthetic, imdb, reuters"):
        D.get_batch("cifar", 2, 200)


def test_task_info():
    assert D.task_info("needle")["n_classes"] == 32 and D.task_info("needle")["causal"]
    assert D.task_info("reuters")["n_classes"] == 46 and D.task_info("reuters")["seq_len"] == 2400
    assert D.task_info("imdb")["seq_len"] == 200 and D.task_info("synthetic")["input"] == "real"


class _RunsShell:
    """Pickles as a call of os.system: what a crafted dataset does to run code on load."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_object_member(zf, key, payload, shape=(1,)):
    from numpy.lib import format as npy
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": shape})
    zf.writestr(f"{key}.npy", buf.getvalue() + payload)


def test_keras_loader_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"
    good = write_fake_keras_npz(str(tmp_path / "g.npz"), "imdb", n_train=4, n_test=3)
    crafted = tmp_path / "imdb.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(crafted, "w") as dst:
        for name in src.namelist():
            if name != "x_train.npy":
                dst.writestr(name, src.read(name))
        _write_object_member(dst, "x_train", pickle.dumps(_RunsShell(f"touch {marker}"), protocol=2))
    with pytest.raises(ValueError, match=r"imdb\.npz \(x_train\): refused to load: .*(posix|os|nt)\.system") as e:
        load(str(crafted), "imdb")
    assert isinstance(e.value, D.UnsafeDataError)
    assert not marker.exists()
    # the real files' object arrays (lists of ints, pickled by NumPy 1 or 2) still load
    ds = load(good, "imdb", seq_len=20)
    assert ds.x_train.shape == (4, 20)


def test_keras_loader_reads_numpy1_pickles(tmp_path):
    # Keras' files were written by NumPy 1 (pickle protocol 3; the reconstructor in numpy.core.multiarray).
    seqs = [[5, 9, 2], [7]]
    a = np.empty(2, dtype=object)
    a[:] = seqs
    blob = pickle.dumps(a, protocol=3).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    p = tmp_path / "old.npz"
    with zipfile.ZipFile(p, "w") as z:
        for key in ("x_train", "x_test"):
            _write_object_member(z, key, blob, shape=(2,))
        for key in ("y_train", "y_test"):
            buf = io.BytesIO()
            np.save(buf, np.array([0, 1]))
            z.writestr(f"{key}.npy", buf.getvalue())
    ds = load(str(p), "imdb", seq_len=5)
    assert ds.x_train.tolist() == [[0, 1, 8, 12, 5], [0, 0, 0, 1, 10]]


def test_synthetic_fixed_set_is_epochs_over_the_same_sequences():
    """--train-size N: epochs over the same N sequences (each once per epoch, reshuffled per epoch),
    labels still the sign of the sum; the 'eval' stream stays outside the set."""
    def epoch(e):  # 10 sequences, batch 5: two steps per epoch
        return np.concatenate([S.pool_batch(5, 6, 3, 10, seed=2, step=2 * e + k)[0] for k in range(2)])
    e0, e1 = epoch(0), epoch(1)
    assert len({r.tobytes() for r in e0}) == 10
    assert {r.tobytes() for r in e0} == {r.tobytes() for r in e1} and not np.array_equal(e0, e1)
    x, y = S.pool_batch(4, 6, 3, 10, seed=2, step=7)
    assert x.dtype == np.float32 and np.array_equal(y, (x.astype(np.float64).sum(axis=(1, 2)) > 0).astype(int))
    assert not np.array_equal(epoch(0), np.concatenate([S.pool_batch(5, 6, 3, 10, seed=3, step=k)[0]
                                                        for k in range(2)]))  # the seed picks the set
    ev = S.synthetic_batch(50, 6, 3, seed=2, step=0, split="eval")[0]
    assert not any(r.tobytes() in {q.tobytes() for q in e0} for r in ev)


def test_registry_lists_the_tasks_in_order():
    assert tasks.names()[:4] == ("needle", "synthetic", "imdb", "reuters")
    assert [tasks.get(n).seq_len for n in tasks.names()[:4]] == [2048, 1024, 200, 2400]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.get("nope")
