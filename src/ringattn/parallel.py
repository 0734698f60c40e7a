"""Ranks as sequence-parallel x data-parallel groups, gradient reduction, consistency checks.

World ranks are split into data-parallel replicas of `sp` consecutive ranks each: ranks
[g*sp, (g+1)*sp) form sequence group g and run one ring over the sequence; rank r holds part
r % sp of the sequence of replica r // sp. Parameters are replicated on every rank.

Gradients: each rank's gradients cover its own tokens only, so they are summed over the sequence
group, and averaged over the data-parallel replicas (each replica's loss is a mean over its own
equal share of the batch). Both reductions are one Allreduce(SUM) over the world followed by /dp.

Every collective here runs under watchdog.guard, so a stopped or dead peer aborts the job with a
line naming the call and step instead of hanging it.
"""
import hashlib
import os
import sys
import traceback

import numpy as np

from . import watchdog


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


def set_threads(n):
    """Set OpenMP (kernels) and OpenBLAS (NumPy) threads of this process to n, after start-up.

    OMP_NUM_THREADS is read when the libraries load, which happened on `import ringattn`; so call
    the libraries' own setters through ctypes. Returns the libraries that accepted the setting.
    """
    import ctypes
    done = []
    with open("/proc/self/maps") as f:
        libs = sorted({ln.split()[-1] for ln in f if ".so" in ln and ("gomp" in ln or "openblas" in ln)})
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("omp_set_num_threads", "openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                    "openblas_set_num_threads64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(int(n)))
                done.append(sym)
                break
    os.environ["OMP_NUM_THREADS"] = str(n)  # for any child processes (and libraries not loaded yet)
    return done


def default_threads(mine, node_masks):
    """Kernel threads for a rank: the cores it may use (`mine`, a set of core ids) divided by the
    ranks of its node whose cores overlap them (`node_masks`, one set per node-local rank, itself
    included), at least 1. Unbound ranks all overlap and share the cores; ranks bound to their
    own cores keep all of them."""
    sharing = sum(1 for m in node_masks if m & mine)
    return max(1, len(mine) // max(sharing, 1))


def oversubscription(node_masks, node_threads):
    """(threads, cores) of one node when its ranks' threads exceed the cores they may use, else None."""
    cores = len(set().union(*node_masks))
    threads = sum(node_threads)
    return (threads, cores) if threads > cores else None


def _env_threads():
    """OMP_NUM_THREADS as an int (its first level when nested, "4,2"), or None when unset/unparsable."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def configure_threads(world, requested=0):
    """Choose and set this rank's kernel threads; collective over `world`. Returns (threads, warning).

    requested > 0 (--threads) wins, then OMP_NUM_THREADS; with neither, default_threads: without it
    every rank would start one thread per core of the node and the ranks would fight for them.
    warning (rank 0, else None): one line when some node runs more threads than its cores.
    """
    from mpi4py import MPI
    try:
        mine = frozenset(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        mine = frozenset(range(os.cpu_count() or 1))
    with watchdog.guard("thread setup (node-local allgather)", None, world):
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        masks = local.allgather(mine)
        n = requested or _env_threads()
        if requested or n is None:
            n = requested or default_threads(mine, masks)
            set_threads(n)
        node_threads = local.allgather(n)
        over = oversubscription(masks, node_threads)
        first = local.Get_rank() == 0
        local.Free()
        report = (os.uname().nodename, node_threads, over) if over and first else None
        reports = world.gather(report, root=0)
    warning = None
    bad = [r for r in (reports or []) if r]
    if bad:
        host, node_threads, (threads, cores) = bad[0]
        t0 = node_threads[0]
        per = (f"{len(node_threads)} ranks x {t0} thread{'' if t0 == 1 else 's'}" if len(set(node_threads)) == 1
               else f"{len(node_threads)} ranks with {threads} threads in all")
        warning = (f"warning: {per} on {cores} cores of {host}"
                   f"{f' (and {len(bad) - 1} more nodes)' if len(bad) > 1 else ''}: the ranks compete for cores "
                   f"and run slower; use fewer ranks per node, or --threads / OMP_NUM_THREADS")
    return n, warning


# ---- setup ------------------------------------------------------------------------------------

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


def install_excepthook(comm=None):
    """Make an uncaught exception on any rank end the whole job (MPI_Abort), also without `-m mpi4py`.

    Without this, the other ranks would wait forever in their next collective.
    """
    from mpi4py import MPI
    comm = comm or MPI.COMM_WORLD
    previous = sys.excepthook

    def hook(kind, value, tb):
        rank = comm.Get_rank()
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"[rank {rank}] unhandled exception, aborting the MPI job:\n{text}")
        sys.stderr.flush()
        try:
            comm.Abort(1)
        finally:  # pragma: no cover - Abort does not return
            previous(kind, value, tb)

    sys.excepthook = hook
    return previous


# ---- gradients and parameters -----------------------------------------------------------------

def to_host(a):
    """NumPy view/copy of a NumPy or CuPy array."""
    return a.get() if hasattr(a, "__cuda_array_interface__") else np.asarray(a)


def allreduce_mean(grads, world, dp, extra=(), step=None):
    """Sum `grads` (dict name -> array) over all ranks, divide by dp; in place, one message.

    Packed into one flat buffer in sorted-name order so every rank sends the same layout.
    Device (CuPy) gradients are packed on the device and reduced through one host copy (the PyPI
    MPI builds are not CUDA-aware). `extra`: a few floats summed (not divided) in the same
    message, returned as a float64 array (saves a second collective per step). `step` names the
    training step in the watchdog's message.
    """
    from mpi4py import MPI

    from .layers import array_module
    names = sorted(grads)
    xp = array_module(grads[names[0]]) if names else np
    dtype = np.result_type(*[grads[n].dtype for n in names]) if names else np.float64
    # the extras travel in the gradient dtype (counts < 2**24 stay exact in float32)
    ext = np.asarray(extra, dtype=dtype) if len(extra) else None
    parts = [xp.ascontiguousarray(grads[n], dtype=dtype).ravel() for n in names]
    flat = xp.concatenate(parts) if parts else xp.zeros(0, dtype)
    host = to_host(flat)
    if ext is not None:
        host = np.concatenate([host, ext])
    with watchdog.guard("gradient allreduce", step, world):
        world.Allreduce(MPI.IN_PLACE, host, op=MPI.SUM)
    out = None
    if ext is not None:
        out = host[flat.size:].astype(np.float64)
        host = host[:flat.size]
    if dp != 1:
        host /= dp
    flat = xp.asarray(host)
    at = 0
    for n in names:
        g = grads[n]
        g[...] = flat[at:at + g.size].reshape(g.shape)
        at += g.size
    return grads if out is None else out


def allreduce_sum_scalars(values, comm, what="scalar allreduce", step=None):
    """Sum a few float statistics (loss, correct, count) over `comm`; returns a float64 array."""
    from mpi4py import MPI
    buf = np.asarray(values, dtype=np.float64).copy()
    with watchdog.guard(what, step):
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf


def checksum(params):
    """sha256 over every parameter's name, dtype, shape and bytes, in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(to_host(params[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_identical(params, comm, step):
    """Raise the same clear error on every rank if the parameters differ anywhere."""
    mine = checksum(params)
    with watchdog.guard("parameter check (allgather)", step):
        sums = comm.allgather(mine)
    bad = [r for r, s in enumerate(sums) if s != sums[0]]
    if bad:
        raise RuntimeError(f"parameters differ across ranks at step {step}: ranks {bad} disagree with rank 0 "
                           f"(replicated parameters diverged; a rank applied a different update)")
    return mine
