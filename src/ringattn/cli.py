"""Command line: `ringattn <command>` (also `python -m ringattn`).

Each command lives in its own module exposing add_arguments(parser) and run(args) -> exit code;
they are imported only when used so `ringattn --help` stays fast and needs no MPI.
"""
import argparse
import importlib
import sys

COMMANDS = {
    "train": ("ringattn.train", "train a Blockwise Transformer with ring attention (run under mpiexec)"),
    "bench": ("ringattn.bench", "benchmarks: kernel, ring, train, all"),
    "plan": ("ringattn.plan", "capacity planner: memory, minimum block size, Slurm layout"),
    "info": ("ringattn.info", "versions, MPI, CUDA and build details for bug reports"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ringattn", description="Exact ring attention over MPI ranks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == wanted:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[args.command][0]).run(args) or 0
