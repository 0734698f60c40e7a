"""Moving ring blocks between neighbours: the only place ring.py touches message passing.

A transport owns the preallocated double buffers and the requests of one ring step:

    a, b = t.alloc(shape, dtype)   # two buffers, reused across calls (no allocation per step)
    t.start(send, recv)            # post Irecv(recv) from the ring source, Isend(send) to the destination
    t.overlap(fn)                  # run the step's compute while the posted messages make progress
    t.wait()                       # complete the step's messages

`send` / `recv` are contiguous slices of the buffers (the ring sends plane prefixes/suffixes).
HostTransport moves NumPy buffers. A CUDA build adds transports with the same four methods
(device buffers for a CUDA-aware MPI, pinned host staging otherwise) and ring.py stays as it is.

Progress. The MPICH wheel (ch4, shared memory) moves a large message only while one of the two
ranks is inside an MPI call: posted Isend/Irecv do nothing while the kernel runs, and the copy then
happens in Wait, after the compute. `progress="thread"` (default) runs a small poller thread that
calls Testall every `poll_s` seconds while the kernel runs on the calling thread (the kernel
releases the GIL; mpi4py initialises MPI with THREAD_MULTIPLE). It sleeps between polls, so it takes
almost no CPU from the kernel. `progress="none"` relies on the MPI alone (for example MPICH's
MPIR_CVAR_ASYNC_PROGRESS=1, which needs MPI_THREAD_MULTIPLE and spins a progress thread per rank).

Measured (`ringattn bench ring`, P=2, seq 16384, 8 heads, dim 64, 2-core machine, numbers in
benchmarks/results/ring_cpu.txt): with the poller thread the time spent waiting for a step's message
after its compute is ~0.1 ms per call; with no progress it is 30-200 ms (the 32 MiB K/V copy happens
in Wait). MPICH async progress also hides the copy but its spinning thread slows the kernels of the
whole process 2x (4x on a loaded machine) when each rank has one core, so it is not the default.
At this size the copy is only ~2% of a step either way (forward efficiency 1.03 with the thread,
fwd+bwd 0.97); it matters more for faster kernels (GPU) and larger heads x dim per token. Chunking the compute with
Testall between chunks was not needed: the thread costs no extra kernel calls.
"""
import os
import threading
import time

import numpy as np

PROGRESS_MODES = ("thread", "none")


def _progress_mode(progress):
    mode = progress or os.environ.get("RINGATTN_PROGRESS", "thread")
    if mode not in PROGRESS_MODES:
        raise ValueError(f"unknown progress mode {mode!r}: use one of {', '.join(PROGRESS_MODES)}")
    return mode


class HostTransport:
    """Ring transport for host (NumPy) buffers over an mpi4py communicator."""

    xp = np  # array module of the buffers

    def __init__(self, comm, src, dst, progress=None, poll_s=2e-4):
        self.comm, self.src, self.dst = comm, src, dst
        self.progress = _progress_mode(progress)
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

    def start(self, send, recv):
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

    def overlap(self, fn):
        """Run fn() (the step's compute); messages in flight keep moving meanwhile."""
        c0 = time.thread_time()
        try:
            if not self._reqs or self.progress == "none":
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
