"""Gradients over the ranks: one Allreduce per step, and the check that replicas stay identical.

Each rank's gradients cover its own tokens only, so they are summed over the sequence group, and
averaged over the data-parallel replicas (each replica's loss is a mean over its own equal share
of the batch). Both reductions are one Allreduce(SUM) over the world followed by /dp, one message
per step (GradientReducer) over the flat gradient buffer itself (flat.FlatArrays), on the host
or, for device gradients, over CUDA-aware MPI or one pinned staging buffer. Every collective runs
under watchdog.guard.
"""
import hashlib
import time

import numpy as np

from . import backends, watchdog


POLL_S = 2e-4  # the Iallreduce polling interval where ranks outnumber cores (the ring transport's)


def poll_interval(world):
    """POLL_S when some node of `world` runs more ranks than the cores they may use, else None (a
    blocking Allreduce: with a core per rank nobody is starved, and a sleep only adds latency).
    Collective over `world` (node-local Split_type + allgather of the ranks' CPU affinities)."""
    from mpi4py import MPI
    from . import threads
    mine = threads.my_cores()
    with watchdog.guard("node size (node-local allgather)", None, world):
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        masks = local.allgather(mine)
        local.Free()
        over = threads.oversubscription(masks, [1] * len(masks)) is not None
        over = world.allreduce(over, op=MPI.LOR)  # one verdict everywhere (it only changes how ranks wait)
    return POLL_S if over else None


def to_host(a):
    """A host NumPy copy of a host or device array (its backend's to_host)."""
    return backends.backend_for(a).to_host(a)


class GradientReducer:
    """Sums every gradient, and a few statistics, over the world in ONE Allreduce per step.

        reduce = GradientReducer(world)
        extras = reduce.flat(grads, dp, extra=[loss, correct, count], step=s)  # flat.FlatArrays, in place
        extras = reduce(grads_dict, dp, extra=[...], step=s)                   # a dict: packed, then unpacked

    The trainer's gradients are a flat.FlatArrays (one buffer per dtype, the model's one dtype in
    practice): each buffer is reduced where it is, the statistics in the spare tail of the main
    buffer, in its dtype (counts < 2**24 stay exact in float32), so there is no packing copy. A
    plain dict is packed into a flat buffer kept across steps (sorted-name order, so every rank
    sends the same layout) and unpacked after. Where a buffer travels from follows its backend:
    - host arrays: the buffer itself;
    - device arrays, CUDA-aware MPI: the device buffer itself, handed to MPI once the current stream
      (which wrote it) is synchronised;
    - device arrays otherwise (the PyPI MPI builds): a pinned host mirror kept across steps; the
      device buffer is copied into it, reduced there and copied back on the current stream, before
      any kernel that reads the gradients.
    cuda_aware: None asks mpi_info.mpi_cuda_aware() (RINGATTN_CUDA_AWARE_MPI overrides) at the first
    device gradients. `step` names the training step in the watchdog's message.
    poll_s: None, a blocking Allreduce; a number, an Iallreduce tested every poll_s seconds with
    sleeps in between, so that ranks that finished their step early do not busy-wait in MPI on the
    cores the others still compute on (more ranks than cores), as the ring transport waits.
    """

    def __init__(self, world, cuda_aware=None, poll_s=None):
        self.world, self.cuda_aware, self.poll_s = world, cuda_aware, poll_s
        self._key = self._buf = None    # the dict path's packing buffer
        self._mirrors = {}              # (size, dtype) -> pinned host mirror of a device buffer

    def staged(self, be):
        """True when device gradients travel through a pinned host buffer."""
        if be.name == "cpu":
            return False
        if self.cuda_aware is None:
            from .mpi_info import mpi_cuda_aware
            self.cuda_aware = bool(mpi_cuda_aware())
        return not self.cuda_aware

    def _mirror(self, be, size, dtype):
        """The pinned host mirror of a device buffer of (size, dtype), kept across steps."""
        key = (size, np.dtype(dtype))
        if key not in self._mirrors:
            nbytes = size * key[1].itemsize
            mem = be.xp.cuda.alloc_pinned_memory(nbytes)
            self._mirrors[key] = np.frombuffer(mem, dtype=np.uint8, count=nbytes).view(key[1])
        return self._mirrors[key]

    def flat(self, grads, dp, extra=(), step=None):
        """Reduce a flat.FlatArrays in place (summed, / dp); returns the summed `extra` (float64)."""
        ext = np.asarray(extra, dtype=grads.layout.main)
        if ext.size > grads.tail:
            raise ValueError(f"GradientReducer.flat: {ext.size} statistics, but the gradient buffer has "
                             f"room for {grads.tail} (FlatArrays(tail=...))")
        out = np.zeros(0)
        for dt, buf in grads.buffers.items():
            n = grads.layout.sizes[dt]
            mine = ext if dt == grads.layout.main else ext[:0]
            got = self._reduce(grads.be, buf[:n + mine.size], n, mine, dp, step)
            if dt == grads.layout.main:
                out = got
        return out

    def __call__(self, grads, dp, extra=(), step=None):
        """Reduce a name -> array dict in place through one packed buffer; returns the summed `extra`."""
        names = sorted(grads)
        be = backends.backend_for(**grads) if names else backends.cpu
        dtype = np.result_type(*[grads[n].dtype for n in names]) if names else np.float64
        ext = np.asarray(extra, dtype=dtype)
        n = sum(grads[k].size for k in names)
        key = (be.name, n + ext.size, np.dtype(dtype))
        if key != self._key:
            self._key, self._buf = key, be.empty((n + ext.size,), dtype)
        buf = self._buf
        if names:
            be.xp.concatenate([grads[k].astype(dtype, copy=False).ravel() for k in names], out=buf[:n])
        out = self._reduce(be, buf, n, ext, dp, step)
        at = 0
        for k in names:
            g = grads[k]
            g[...] = buf[at:at + g.size].reshape(g.shape)
            at += g.size
        return out

    def _reduce(self, be, buf, n, ext, dp, step):
        """One Allreduce(SUM) of buf (1-D: n gradient elements, then len(ext) statistics written here);
        the gradients divided by dp in place, the summed statistics returned as float64."""
        from mpi4py import MPI
        host = buf if be.name == "cpu" else (self._mirror(be, buf.size, buf.dtype) if self.staged(be) else None)
        if host is not None and host is not buf:
            buf.get(out=host)  # waits for the kernels that wrote the gradients, so the host sees them all
        if host is not None:
            host[n:] = ext
            wire = host
        else:
            buf[n:] = be.asarray(ext)
            be.xp.cuda.get_current_stream().synchronize()  # MPI reads device memory the stream just wrote
            wire = buf
        with watchdog.guard("gradient allreduce", step, self.world):
            if self.poll_s is None:
                self.world.Allreduce(MPI.IN_PLACE, wire, op=MPI.SUM)
            else:
                req = self.world.Iallreduce(MPI.IN_PLACE, wire, op=MPI.SUM)
                while not req.Test():
                    time.sleep(self.poll_s)
        if host is not None:
            out = host[n:].astype(np.float64)
            if dp != 1:
                host[:n] /= dp
            if host is not buf:  # back to the device, ordered before the gradients' readers on the same stream
                be.xp.cuda.runtime.memcpyAsync(buf.data.ptr, host.ctypes.data, n * host.itemsize,
                                               be.xp.cuda.runtime.memcpyHostToDevice,
                                               be.xp.cuda.get_current_stream().ptr)
        else:
            out = be.to_host(buf[n:]).astype(np.float64)
            if dp != 1:
                buf[:n] /= dp
        return out


def allreduce_mean(grads, world, dp, extra=(), step=None):
    """Sum `grads` (dict name -> array) over all ranks, divide by dp; in place, one message (a
    GradientReducer used once: callers that reduce every step keep one). `extra`: a few floats
    summed (not divided) in the same message, returned as a float64 array; without extras the
    grads are returned."""
    out = GradientReducer(world)(grads, dp, extra, step)
    return out if len(extra) else grads


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
