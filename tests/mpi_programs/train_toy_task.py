"""A task defined outside ringattn, in this one file, trained by the unchanged `ringattn train`.

    mpiexec -n 2 python -m mpi4py tests/mpi_programs/train_toy_task.py --task majority --steps 60 --no-progress

The task: sequences of 0/1 tokens, label = whether ones are the majority. Registering the class is
all it takes; the trainer finds it through ringattn.tasks like the built-in ones.
"""
import sys

import numpy as np

from ringattn import cli
from ringattn.data import rng_for
from ringattn.tasks import Task, register


@register
class Majority(Task):
    name = "majority"
    help = "0/1 tokens, label = whether ones are the majority"
    head, causal, input, vocab, n_classes = "cls", False, "tokens", 2, 2
    seq_len = 15  # odd: no ties

    def batch(self, step, seq_len, batch, split="train"):
        x = rng_for(self.seed, split, step).integers(0, 2, size=(batch, seq_len)).astype(np.int32)
        return x, (2 * x.sum(axis=1) > seq_len).astype(np.int64)


if __name__ == "__main__":
    raise SystemExit(cli.main(["train", *sys.argv[1:]]))
