"""`ringattn bench <what>`: benchmarks that print tables of measured ratios against baselines run
in the same process (this kind of machine is shared and noisy), and save results as JSON.

Each benchmark module (kernel, ring, train) exposes add_arguments(parser) and run(args).
"""
import argparse
import importlib
import sys

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
