"""Small Keras-format dataset files for tests (the format of imdb.npz / reuters.npz)."""
import numpy as np

from ringattn import tasks


def write_fake_keras_npz(path, name="imdb", n_train=64, n_test=32, max_words=300, max_len=50, seed=0):
    """Write a small file in the Keras format (object arrays of word-index lists) for task `name`."""
    n_classes = tasks.get(name).n_classes
    rng = np.random.default_rng(seed)

    def seqs(n):
        a = np.empty(n, dtype=object)
        for i in range(n):
            a[i] = [int(w) for w in rng.integers(1, max_words, size=rng.integers(1, max_len + 1))]
        return a

    np.savez(path, x_train=seqs(n_train), y_train=rng.integers(0, n_classes, n_train),
             x_test=seqs(n_test), y_test=rng.integers(0, n_classes, n_test))
    return path
