"""Ranks as sequence-parallel x data-parallel groups, gradient reduction, consistency checks.

World ranks are split into data-parallel replicas of `sp` consecutive ranks each: ranks
[g*sp, (g+1)*sp) form sequence group g and run one ring over the sequence; rank r holds part
r % sp of the sequence of replica r // sp. Parameters are replicated on every rank.

Gradients: each rank's gradients cover its own tokens only, so they are summed over the sequence
group, and averaged over the data-parallel replicas (each replica's loss is a mean over its own
equal share of the batch). Both reductions are one Allreduce(SUM) over the world followed by /dp,
one message per step (GradientReducer), on the host or, for device gradients, over CUDA-aware MPI
or one pinned staging buffer.

Every collective here runs under watchdog.guard, so a stopped or dead peer aborts the job with a
line naming the call and step instead of hanging it.
"""
import hashlib
import os
import sys
import traceback

import numpy as np

from . import backends, watchdog


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
    """A host NumPy copy of a host or device array (its backend's to_host)."""
    return backends.backend_for(a).to_host(a)


class GradientReducer:
    """Sums every gradient, and a few statistics, over the world in ONE Allreduce per step.

        reduce = GradientReducer(world)
        extras = reduce(grads, dp, extra=[loss, correct, count], step=s)   # grads summed, / dp, in place

    Packed into one flat buffer in sorted-name order (every rank sends the same layout), the
    statistics after the gradients in the same dtype (counts < 2**24 stay exact in float32). The
    buffer is kept across steps. Where it lives follows the gradients' backend:
    - host arrays: a NumPy buffer;
    - device arrays, CUDA-aware MPI: the device buffer itself, handed to MPI once the current stream
      (which packed it) is synchronised;
    - device arrays otherwise (the PyPI MPI builds): one pinned host buffer; the packed device buffer
      is copied into it, reduced there and copied back on the current stream, before the unpacking
      kernels that read it.
    cuda_aware: None asks mpi_info.mpi_cuda_aware() (RINGATTN_CUDA_AWARE_MPI overrides) at the first
    device gradients. `step` names the training step in the watchdog's message.
    """

    def __init__(self, world, cuda_aware=None):
        self.world, self.cuda_aware = world, cuda_aware
        self._key = self._buf = self._host = None

    def staged(self, be):
        """True when device gradients travel through the pinned host buffer."""
        if be.name == "cpu":
            return False
        if self.cuda_aware is None:
            from .mpi_info import mpi_cuda_aware
            self.cuda_aware = bool(mpi_cuda_aware())
        return not self.cuda_aware

    def _buffers(self, be, size, dtype):
        """(flat buffer on the gradients' side, pinned host mirror or None), kept while size/dtype hold."""
        key = (be.name, size, np.dtype(dtype))
        if key != self._key:
            self._key, self._buf, self._host = key, be.empty((size,), dtype), None
            if self.staged(be):
                nbytes = size * np.dtype(dtype).itemsize
                mem = be.xp.cuda.alloc_pinned_memory(nbytes)
                self._host = np.frombuffer(mem, dtype=np.uint8, count=nbytes).view(dtype)
        return self._buf, self._host

    def __call__(self, grads, dp, extra=(), step=None):
        from mpi4py import MPI
        names = sorted(grads)
        be = backends.backend_for(**grads) if names else backends.cpu
        dtype = np.result_type(*[grads[n].dtype for n in names]) if names else np.float64
        ext = np.asarray(extra, dtype=dtype)
        n = sum(grads[k].size for k in names)
        buf, host = self._buffers(be, n + ext.size, dtype)
        if names:
            be.xp.concatenate([grads[k].astype(dtype, copy=False).ravel() for k in names], out=buf[:n])
        if be.name == "cpu":
            host = buf
        elif host is not None:
            buf.get(out=host)  # waits for the packing kernels, so the host sees the whole buffer
        if host is not None:
            host[n:] = ext
            wire = host
        else:
            buf[n:] = be.asarray(ext)
            be.xp.cuda.get_current_stream().synchronize()  # MPI reads device memory the stream just wrote
            wire = buf
        with watchdog.guard("gradient allreduce", step, self.world):
            self.world.Allreduce(MPI.IN_PLACE, wire, op=MPI.SUM)
        if host is not None:
            out = host[n:].astype(np.float64)
            if dp != 1:
                host[:n] /= dp
            if be.name != "cpu":  # back to the device, ordered before the unpacking on the same stream
                be.xp.cuda.runtime.memcpyAsync(buf.data.ptr, host.ctypes.data, n * host.itemsize,
                                               be.xp.cuda.runtime.memcpyHostToDevice,
                                               be.xp.cuda.get_current_stream().ptr)
        else:
            out = be.to_host(buf[n:]).astype(np.float64)
            if dp != 1:
                buf[:n] /= dp
        at = 0
        for k in names:
            g = grads[k]
            g[...] = buf[at:at + g.size].reshape(g.shape)
            at += g.size
        return out


def allreduce_mean(grads, world, dp, extra=(), step=None):
    """Sum `grads` (dict name -> array) over all ranks, divide by dp; in place, one message (a
    GradientReducer used once: callers that reduce every step keep one). `extra`: a few floats
    summed (not divided) in the same message, returned as a float64 array; without extras the
    grads are returned."""
    out = GradientReducer(world)(grads, dp, extra, step)
    return out if len(extra) else grads


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
