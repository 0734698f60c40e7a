"""Moving ring blocks between neighbours: the only place ring.py touches message passing.

A transport owns the preallocated double buffers and the requests of one ring step:

    a, b = t.alloc(shape, dtype)   # two buffers, reused across calls (no allocation per step)
    t.start(send, recv)            # post Irecv(recv) from the ring source, Isend(send) to the destination
                                   # (unchanged=n: n leading bytes of send are forwarded as they arrived)
    t.overlap(fn)                  # run the step's compute while the posted messages make progress
    t.wait()                       # complete the step's messages

`send` / `recv` are contiguous slices of the buffers (the ring sends plane prefixes/suffixes).
HostTransport moves NumPy buffers; transport_cuda.DeviceTransport has the same methods for device
buffers (CUDA-aware MPI, or pinned host staging). ring.py gets its transport from the backend of its
inputs (backends.cpu / backends.cuda make_transport), so the ring logic is the same for both.

Progress. The MPICH wheel (ch4, shared memory) moves a large message only while one of the two
ranks is inside an MPI call: posted Isend/Irecv do nothing while the kernel runs, and the copy then
happens in Wait, after the compute. `progress="thread"` (default) runs a small poller thread that
calls Testall every `poll_s` seconds while the kernel runs on the calling thread (the kernel
releases the GIL). It sleeps between polls, so it takes almost no CPU from the kernel. The thread
calls MPI while other threads may, which MPI allows only at MPI_THREAD_MULTIPLE (mpi4py's default
request): when MPI was initialised at a lower level (mpi4py.rc.thread_level), "thread" falls back to
"chunks" with a one-line note. `progress="chunks"` calls Testall on the calling thread between the
kernel calls of a step (one per query/key segment pair), so messages move a little during the compute
without a second thread. `progress="none"` relies on the MPI alone (for example MPICH's
MPIR_CVAR_ASYNC_PROGRESS=1, which needs MPI_THREAD_MULTIPLE and spins a progress thread per rank).

Why the poller thread is the default: without it the K/V copy of a step happens in Wait, after
the compute, instead of during it; MPICH's async progress also hides the copy, but its spinning
thread takes the core from the kernels when each rank has one core. The exposed copy matters more
for faster kernels (GPU) and larger heads x dim per token. (Measurements, with their commands:
docs/performance.md, "Ring".) "chunks" is the fallback, not the default: a step has only a few
kernel calls (one per segment pair), so a message moves only at those few points instead of all
through the compute. Where a node runs more ranks than cores (the main job: 4 ranks on 2 cores) the
trainer asks for "chunks" (oversubscribed_progress): there the poller's wake-ups take turns on a core
with the other rank's kernels, and the copy is cheap next to the compute it would hide.
"""
import os
import sys
import threading
import time

import numpy as np

PROGRESS_MODES = ("thread", "chunks", "none")
_noted = False  # the fallback note is printed once per process


def _progress_mode(progress):
    mode = progress or os.environ.get("RINGATTN_PROGRESS", "thread")
    if mode not in PROGRESS_MODES:
        raise ValueError(f"unknown progress mode {mode!r}: use one of {', '.join(PROGRESS_MODES)}")
    return mode


def oversubscribed_progress(oversubscribed):
    """The progress mode to ask for: "chunks" where ranks outnumber the cores (see above), unless
    RINGATTN_PROGRESS names one; None (the usual default) elsewhere."""
    return "chunks" if oversubscribed and "RINGATTN_PROGRESS" not in os.environ else None


def _thread_safe_mode(mode, comm):
    """"thread" needs MPI_THREAD_MULTIPLE (a second thread calls MPI); below it, use "chunks"."""
    from mpi4py import MPI
    if mode != "thread" or MPI.Query_thread() >= MPI.THREAD_MULTIPLE:
        return mode
    global _noted
    if not _noted and comm.Get_rank() == 0:
        levels = {MPI.THREAD_SINGLE: "SINGLE", MPI.THREAD_FUNNELED: "FUNNELED", MPI.THREAD_SERIALIZED: "SERIALIZED"}
        sys.stderr.write(f"ringattn: MPI was initialised with MPI_THREAD_{levels.get(MPI.Query_thread(), '?')}, "
                         f"not MULTIPLE: ring progress polls between kernel calls (progress='chunks') "
                         f"instead of from a helper thread\n")
        sys.stderr.flush()
    _noted = True
    return "chunks"


class HostTransport:
    """Ring transport for host (NumPy) buffers over an mpi4py communicator."""

    xp = np  # array module of the buffers

    def __init__(self, comm, src, dst, progress=None, poll_s=2e-4):
        self.comm, self.src, self.dst = comm, src, dst
        self.progress = _thread_safe_mode(_progress_mode(progress), comm)
        self.poll_s = poll_s
        self._pool = np.empty(0, dtype=np.uint8)
        self._reqs = []
        # for benchmarks: time in wait() (exposed communication) and CPU time of the compute
        self.wait_s = self.compute_cpu_s = 0.0

    def alloc(self, shape, dtype):
        """Two buffers of `shape`, carved from one pool kept across calls (grown when too small)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        if self._pool.nbytes < 2 * n:
            self._pool = None  # free the old pool before allocating the new one
            self._pool = np.empty(2 * n, dtype=np.uint8)
        return tuple(self._pool[i * n:(i + 1) * n].view(dtype).reshape(shape) for i in (0, 1))

    def release(self):
        """Drop the buffers (they are reallocated on the next alloc)."""
        self._pool = np.empty(0, dtype=np.uint8)

    def start(self, send, recv, unchanged=0):
        """Post Irecv(recv) and Isend(send). `unchanged` (leading bytes of `send` that arrived with the
        last message, unmodified) matters only to staging device transports: host buffers are sent as they are."""
        if self._reqs:
            raise RuntimeError("ringattn transport: previous step's messages were not completed")
        self._reqs = [self.comm.Irecv(recv, source=self.src, tag=7),
                      self.comm.Isend(send, dest=self.dst, tag=7)]

    def test(self):
        from mpi4py import MPI
        return not self._reqs or MPI.Request.Testall(self._reqs)

    def wait(self):
        """Complete the step's messages. Polls with short sleeps instead of MPI's busy Waitall, so a
        rank that finished early does not steal a core from ranks still computing (oversubscribed
        nodes, causal imbalance); costs at most ~poll_s of latency per step."""
        t0 = time.perf_counter()
        while not self.test():
            time.sleep(self.poll_s)
        self._reqs = []
        self.wait_s += time.perf_counter() - t0

    def poll(self):
        """Called by the ring between the kernel calls of a step: Testall in "chunks" mode."""
        if self.progress == "chunks" and self._reqs:
            self.test()

    def overlap(self, fn):
        """Run fn() (the step's compute); messages in flight keep moving meanwhile."""
        c0 = time.thread_time()
        try:
            if not self._reqs or self.progress != "thread":
                return fn()
            return self._overlap_thread(fn)
        finally:
            self.compute_cpu_s += time.thread_time() - c0

    def _overlap_thread(self, fn):
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                if self.test():
                    return
                stop.wait(self.poll_s)

        t = threading.Thread(target=poll, name="ringattn-progress", daemon=True)
        t.start()
        try:
            return fn()
        finally:
            stop.set()
            t.join()
