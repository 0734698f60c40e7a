"""`ringattn train`: train a Blockwise Transformer with ring attention over MPI ranks.

    mpiexec -n 4 python -m mpi4py -m ringattn train            # the main job: needle, curriculum to 2048

Ranks form data-parallel replicas of `sp` consecutive ranks; each replica runs one ring over its
share of the batch (parallel.py). Every rank generates the same global batch from (seed, step),
keeps its replica's rows and its own tokens (the ring layout), and computes partial gradients;
one Allreduce makes them the full-batch gradients on every rank, and every rank applies the same
AdamW step to its copy of the parameters (checked identical every --check-interval steps).
The loss curve therefore does not depend on the number of ranks or on sp (up to float rounding).

Curriculum (needle): stages of (length, global batch), large batches at short lengths, then the
final --seq-len with --batch; the run advances when the train accuracy over the last >= 256
sequences reaches --advance-accuracy, and at the latest when the stage has used its share of
--steps (the shorter stages share the first half of the run), so the run always reaches the
asked length. An explicit --batch caps the default curriculum's batches. Per stage, the
sequence-parallel degree is the largest divisor of --sp leaving shards of >= --min-shard tokens
(short sequences train faster data-parallel); the math is the same for every split. Held-out
evaluation runs at the final length; the run stops at --target-accuracy, --steps or --time-limit
(seconds of this invocation), and with an error (exit 3) at a non-finite loss or gradient norm,
before any checkpoint of that state is written.

--device cuda (parallel.select_backend): CuPy arrays and the CUDA kernels, one GPU per rank (node-
local rank mod the GPUs visible), checked at startup on every rank; the gradients still travel as
one message per step (gradients.GradientReducer: CUDA-aware MPI on the device buffer, or one pinned
host staging buffer). The math, and so the loss curve, is the CPU run's.

Checkpoints (checkpoint.py): world rank 0 writes one every --checkpoint-interval steps and at
the end; --resume continues from the newest (or a given file) so that the loss curve equals an
uninterrupted run. A resumed run may use a different number of ranks, --sp or --layout. A fresh
run refuses a directory holding checkpoints unless --overwrite.

Every collective of the trainer runs under watchdog.guard: a rank that waits longer than
--watchdog seconds for its peers aborts the job with one line naming the rank, call and step.

Files: flags.py (parser, defaults, validation, curriculum), trainer.py (the loop), state.py
(checkpoints), report.py (banner, metrics, summary); the tasks are in ringattn/tasks/.
"""
import os
import sys

from .. import checkpoint as ckpt
from .. import mpi_abort, slurm, watchdog
from ..parallel import UsageError
from .errors import Diverged
from .flags import (DEFAULT_BATCH, DEFAULT_WARMUP, MAX_HEAD_DIM, add_arguments, fill_defaults,  # noqa: F401
                    parse_curriculum, run_config, stage_ends, validate)
from .report import ring_note, summary_text  # noqa: F401
from .state import training_state  # noqa: F401
from .trainer import Trainer


def run(args):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    mpi_abort.install_excepthook(world)
    rank = world.Get_rank()
    pid_dir = os.environ.get("RINGATTN_PID_DIR")  # tests: lets them find (and kill) one rank
    if pid_dir:
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    try:
        slurm.check_world_size(world)  # a wrong srun --mpi plugin gives N one-rank worlds: refuse
        trainer = Trainer(args, world)
        return trainer.train()
    except (UsageError, ckpt.CheckpointError, Diverged) as e:
        # Raised on every rank alike (flags and checkpoints are checked collectively; the loss and
        # gradient norm come out of one Allreduce): one clean line.
        if rank == 0:
            kind = {UsageError: "error", Diverged: "diverged"}.get(type(e), "checkpoint error")
            sys.stderr.write(f"ringattn train: {kind}: {e}\n")
            sys.stderr.flush()
        # `python -m mpi4py` aborts the job at a non-zero exit: without this barrier another rank
        # could end rank 0 before its line is out.
        with watchdog.guard("error report (barrier)", None, world):
            world.Barrier()
        return 3 if isinstance(e, Diverged) else 2
