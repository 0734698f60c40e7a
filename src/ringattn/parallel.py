"""Ranks as sequence-parallel x data-parallel groups: the index math, the communicators, the backend.

World ranks are split into data-parallel replicas of `sp` consecutive ranks each: ranks
[g*sp, (g+1)*sp) form sequence group g and run one ring over the sequence; rank r holds part
r % sp of the sequence of replica r // sp. Parameters are replicated on every rank.

Neighbours: threads.py (kernel threads per rank), gradients.py (one Allreduce per step,
replicas checked identical), mpi_abort.py (an exception on one rank ends the job).

Every collective here runs under watchdog.guard, so a stopped or dead peer aborts the job with a
line naming the call and step instead of hanging it.
"""
import os

from . import backends, watchdog
from .gradients import GradientReducer  # noqa: F401 (bench/train.py imports it from here)


class UsageError(ValueError):
    """A bad flag or combination of flags: reported as one clean message, identical on all ranks."""


# ---- tiny pure functions: index math ----------------------------------------------------------

def check_sp(world, sp):
    """Validate a sequence-parallel degree against the world size; returns the number of replicas."""
    if sp < 1:
        raise UsageError(f"--sp must be >= 1, got {sp}")
    if world % sp:
        raise UsageError(f"--sp {sp} does not divide the number of MPI ranks ({world}); "
                         f"use one of {divisors(world)}")
    return world // sp


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def replica_of(rank, sp):
    """Data-parallel replica (sequence group) of a world rank."""
    return rank // sp


def seq_rank_of(rank, sp):
    """Rank inside its sequence group: which part of the sequence it holds."""
    return rank % sp


def batch_slice(batch, dp, replica):
    """The rows of a global batch that replica `replica` of `dp` trains on (equal shares)."""
    if batch % dp:
        raise UsageError(f"batch {batch} is not divisible by the {dp} data-parallel replicas")
    per = batch // dp
    return slice(replica * per, (replica + 1) * per)


def adaptive_sp(seq_len, batch, world, max_sp, min_shard):
    """Sequence-parallel degree for one curriculum stage.

    Short sequences train faster data-parallel (a ring over 3-token shards is all latency), so
    use the largest divisor d of max_sp with seq_len / d >= min_shard (at least 1), whose
    data-parallel degree world / d divides the batch. The math (loss, gradients) does not
    depend on d, only the speed does.
    """
    best = None
    for d in divisors(max_sp):
        if seq_len < d or batch % (world // d):
            continue
        if best is None or seq_len // d >= min_shard:
            best = d
    if best is None:
        raise UsageError(f"no sequence/data-parallel split of {world} ranks fits seq-len {seq_len} and "
                         f"batch {batch} (the batch must be divisible by world/sp for some sp dividing {max_sp})")
    return best


# ---- setup ------------------------------------------------------------------------------------

def _start_gpu(be, local_rank):
    """Make this rank's GPU current and launch one tiny kernel on it; returns (gpu, visible GPUs).
    Raises RuntimeError saying what is missing."""
    xp = be.array_module()  # RuntimeError without CuPy
    be.module()  # RuntimeError in a build without the CUDA module
    try:
        n = xp.cuda.runtime.getDeviceCount()
    except Exception as e:  # CuPy's CUDARuntimeError: no driver, no device
        raise RuntimeError(f"no CUDA device visible ({type(e).__name__}: {e})") from None
    if n < 1:
        raise RuntimeError(f"no CUDA device visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    gpu = local_rank % n
    xp.cuda.Device(gpu).use()
    # One launch now catches kernels that do not run on this GPU (architecture, driver) before step 1.
    z = be.zeros((1, 2), "float32")
    be.to_host(be.ffn_forward(z, be.zeros((2, 2), "float32"), be.zeros((2,), "float32"), be.zeros((2, 2), "float32"),
                              be.zeros((2,), "float32"), chunk=1))
    return gpu, n


def select_backend(world, device):
    """The backend of --device ('cpu' or 'cuda'); for cuda, this rank's GPU made current. Collective.

    cuda: one GPU per rank, GPU = node-local rank modulo the GPUs this rank sees (under Slurm,
    `srun --gpus-per-task=1` gives each rank its own, seen as GPU 0). Whatever keeps the CUDA
    backend from running (CuPy missing, a build without the CUDA module, no visible GPU, a kernel
    that does not launch) is found here, before any step, and raised as one UsageError naming the
    first rank it happened on, the same on every rank. Returns (backend, (gpu, visible) of each rank
    or None for cpu).
    """
    if device == "cpu":
        return backends.cpu, None
    from mpi4py import MPI
    be = backends.cuda
    with watchdog.guard("GPU setup (node-local split)", None, world):
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = local.Get_rank()
        local.Free()
    try:
        mine, err = _start_gpu(be, local_rank), None
    except Exception as e:  # reported on every rank below, never left to fail at step N
        mine, err = None, str(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
    with watchdog.guard("GPU setup (allgather)", None, world):
        results = world.allgather((mine, err, os.uname().nodename))
    bad = [(r, e, host) for r, (_, e, host) in enumerate(results) if e]
    if bad:
        r, e, host = bad[0]
        more = f" (and {len(bad) - 1} more ranks)" if len(bad) > 1 else ""
        raise UsageError(f"--device cuda: rank {r} on {host}{more}: {e}")
    return be, [m for m, _, _ in results]


class Groups:
    """Communicators of one (sp, dp) split of `world`: seq (ring inside a replica), data (across)."""

    def __init__(self, world, sp):
        self.world = world
        self.sp = sp
        self.dp = check_sp(world.Get_size(), sp)
        r = world.Get_rank()
        self.replica = replica_of(r, sp)
        self.seq_rank = seq_rank_of(r, sp)
        self.seq = world.Split(self.replica, r)
        self.data = world.Split(self.seq_rank, r)

    def free(self):
        for c in (self.seq, self.data):
            c.Free()
