"""synthetic: real-valued sequences, label = whether their sum is positive (the presentation's toy).

x ~ N(0, 1) of shape (batch, seq, --in-features) float32, label = (sum of x > 0), 'cls' head.
By default every train batch is fresh; --train-size N trains epochs over a fixed set of N
sequences instead (shuffled per epoch, as the presentation did), each sequence regenerated from
(seed, index) so the set never has to fit in memory. The held-out set is the 'eval' stream.
"""
import numpy as np

from ..data import SPLITS, rng_for
from ..parallel import UsageError
from .task import Task, register

POOL_STREAM = 1 << 31  # a stream id no (seed, split, step) batch uses


def synthetic_batch(batch, seq_len, in_features=8, seed=0, step=0, split="train"):
    """x (batch, seq_len, in_features) float32 ~ N(0, 1); labels (batch,) int64 = (sum of x > 0)."""
    rng = rng_for(seed, split, step)
    x = rng.standard_normal((batch, seq_len, in_features)).astype(np.float32)
    return x, _labels(x)


def _labels(x):
    return (x.astype(np.float64).sum(axis=(1, 2)) > 0).astype(np.int64)


def pool_batch(batch, seq_len, in_features, train_size, seed=0, step=0):
    """Batch `step` of epochs over a fixed set of `train_size` sequences: a per-epoch shuffle
    (seeded by (seed, epoch)); sequence i is the same array in every epoch."""
    per_epoch = max(train_size // batch, 1)
    epoch, k = divmod(int(step), per_epoch)
    perm = np.random.default_rng([int(seed), SPLITS["train"], 1 << 30, epoch]).permutation(train_size)
    idx = perm[(k * batch + np.arange(batch)) % train_size]
    x = np.stack([np.random.default_rng([int(seed), SPLITS["train"], POOL_STREAM, int(i)])
                  .standard_normal((seq_len, in_features)).astype(np.float32) for i in idx])
    return x, _labels(x)


@register
class Synthetic(Task):
    name = "synthetic"
    order = 1
    help = "real-valued sequences, label = sign of their sum"
    head, causal, input, vocab, n_classes = "cls", False, "real", 1, 2
    seq_len = 1024
    options = ("in_features", "train_size")
    # The presentation: 1000 sequences of 1024 x 512, 4 blocks, 8 heads, batch 32, 10 epochs
    # (10 x 1000 // 32 steps), every epoch run (no early stop).
    experiment = ("--task", "synthetic", "--in-features", "512", "--train-size", "1000", "--seq-len", "1024",
                  "--layers", "4", "--heads", "8", "--batch", "32", "--steps", "310", "--target-accuracy", "0")

    @classmethod
    def add_arguments(cls, group):
        group.add_argument("--in-features", type=int, default=8, help="synthetic: features per position")
        group.add_argument("--train-size", type=int, default=0,
                           help="synthetic: train epochs over this many fixed sequences (0: a fresh batch every step)")

    @classmethod
    def info(cls, in_features=8, **_):
        return dict(super().info(), in_features=in_features)

    @classmethod
    def check_flags(cls, args):
        if args.in_features < 1:
            raise UsageError(f"--in-features must be >= 1, got {args.in_features}")
        if args.train_size < 0:
            raise UsageError(f"--train-size must be >= 0, got {args.train_size}")

    def batch(self, step, seq_len, batch, split="train"):
        n, size = self.opts.get("in_features", 8), self.opts.get("train_size", 0)
        if split == "train" and size:
            return pool_batch(batch, seq_len, n, size, self.seed, step)
        return synthetic_batch(batch, seq_len, n, self.seed, step, split)
