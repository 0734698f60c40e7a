"""Trainer.evaluate(stop_below=a) gives the decision the whole held-out set gives, on every rank.

    mpiexec -n P python -m mpi4py tests/mpi_programs/eval_early_stop.py [--sp S]

A tiny needle model trains a few steps (so its accuracy is neither 0 nor 1), then the full
evaluation and early-stopping ones at thresholds around its accuracy are compared: at or below the
full accuracy the early-stopping call must evaluate everything and return the same figures; above
it, it must say the target is missed (accuracy below a, "eval_complete": False with fewer
sequences, or the complete figures), and may stop only when the misses so far rule the target out.
Prints "ok <evaluated sizes>" on rank 0.
"""
import argparse
import sys

import numpy as np
from mpi4py import MPI

from ringattn.train import Trainer, add_arguments


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sp", default="1")
    own = ap.parse_args()
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--seq-len", "24", "--width", "16", "--heads", "2", "--batch", "8", "--curriculum", "none",
                         "--steps", "30", "--warmup", "5", "--lr", "1e-2", "--eval-size", "96", "--target-accuracy",
                         "0", "--no-progress", "--min-shard", "1", "--sp", own.sp, "--seed", "5"])
    world = MPI.COMM_WORLD
    t = Trainer(args, world)
    for _ in range(30):
        t.train_step()
    full = t.evaluate()
    acc, n = full["eval_accuracy"], full["eval_size"]
    assert n == 96 and "eval_complete" not in full, full
    assert 0 < acc < 1, f"the test needs a model that is neither right nor wrong everywhere: {acc}"
    sizes = []
    for a in (0.0, acc - 1e-9, acc, acc + 1 / 96 - 1e-9, acc + 1e-6, min(acc + 0.2, 1.0), 1.0):
        e = t.evaluate(stop_below=a)
        same = world.allgather((e["eval_size"], e["eval_accuracy"], "eval_complete" in e))
        assert all(s == same[0] for s in same), ("ranks disagree", same)
        sizes.append(e["eval_size"])
        if acc >= a:
            assert e == full, (a, e, full)
        elif "eval_complete" in e:
            assert e["eval_size"] < n, e
            # stopped: even with every remaining sequence right the target was out of reach
            right = e["eval_accuracy"] * e["eval_size"]
            assert right + (n - e["eval_size"]) < a * n + 1e-6, (a, e)
        else:
            assert e == full, (a, e, full)
    assert sizes[-1] < n, f"a target of 1.0 must stop at the first miss's round, evaluated {sizes}"
    if world.Get_rank() == 0:
        print("ok", sizes)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
