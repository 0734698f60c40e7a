"""`ringattn bench <what>`: benchmarks that print tables of measured ratios against baselines run
in the same process (this kind of machine is shared and noisy), and save results as JSON.

Each benchmark module (kernel, ring, train) exposes add_arguments(parser) and run(args).

Without --out, results go to a new folder runs/bench-<UTC time>/ under the current directory
(fresh_dir), so a run never overwrites an earlier one, nor the reference results committed in
benchmarks/results/ when it is started from the repository (/runs/ is ignored by git there).
"""
import argparse
import importlib
import os
import sys
import time

RUNS = "runs"

BENCHES = {
    "kernel": "blockwise attention kernels vs NumPy and PyTorch SDPA (single process)",
    "ring": "ring attention over MPI: overlap, causal load balance, memory per rank",
    "train": "training step tokens/s and FFN activation memory, vs PyTorch when installed",
    "all": "everything above, with JSON and PNG plots",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="bench", metavar="WHAT")
    sub.required = True
    wanted = next((a for a in sys.argv[1:] if a in BENCHES), None)
    for name, help_ in BENCHES.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == wanted:
            importlib.import_module(f"ringattn.bench.{name}").add_arguments(p)


def run(args):
    return importlib.import_module(f"ringattn.bench.{args.bench}").run(args)


def fresh_dir(root=RUNS, now=None):
    """Create and return a directory root/bench-<UTC time> that did not exist before (a -2, -3, ...
    suffix when two runs start in the same second)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    base = os.path.join(root, f"bench-{stamp}")
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no fresh directory name left under {root!r}")


def out_prefix(out, name):
    """The results prefix of a benchmark: --out when given, else <fresh dir>/<name>."""
    return out if out else os.path.join(fresh_dir(), name)
