"""Ring transport for device (CuPy) buffers: the same calls as transport.HostTransport.

    t = DeviceTransport(comm, src, dst)       # cuda_aware=None asks mpi_info.mpi_cuda_aware()
    cur, nxt = t.alloc(shape, dtype)           # two device buffers from one pool
    t.start(send, recv); t.overlap(fn); t.wait()

CUDA-aware MPI: device buffers go to Isend/Irecv directly, after the stream that produced `send`
is synchronised. Otherwise (the PyPI MPI wheels) each message is staged through pinned host memory
on a side copy stream: device -> pinned copy before Isend, pinned -> device copy after the message
arrives, ordered before later compute with an event (no host synchronisation for the way in). A
block forwarded unchanged (start(..., unchanged=n)) is sent from the pinned copy it arrived in: no
second device -> host copy. docs/gpu.md lists the copies that remain exposed per step.

Progress while the GPU computes: kernels launch asynchronously, so `overlap(fn)` launches fn's
kernels and then polls the messages (Testall, short sleeps) until an event recorded after them
completes: messages move during the GPU compute without a helper thread.

STATUS: ring.py uses it for device arrays (backends.cuda.make_transport passes the backend's array
module as `xp`: CuPy, or the test-only emulated device). Checked on a CPU-only machine only: against
host stand-ins of the device calls (tests/test_cuda_transport.py) and under the emulated device, whose
streams and events flag every missing wait (tests/test_emu_device.py, tests/test_ring_device.py);
not yet run on a GPU. Messages are bytes (uint8 views): MPI never infers a type for bfloat16.
"""
import time

import numpy as np

from .transport import HostTransport

_H2D, _D2H = 1, 2  # cudaMemcpyKind


class DeviceTransport(HostTransport):
    """Ring transport for CuPy buffers (CUDA-aware MPI, or pinned host staging)."""

    def __init__(self, comm, src, dst, cuda_aware=None, progress=None, poll_s=2e-4, xp=None):
        super().__init__(comm, src, dst, progress=progress, poll_s=poll_s)
        self.xp = self._array_module() if xp is None else xp  # the array module (CuPy) of the buffers
        if cuda_aware is None:
            from .mpi_info import mpi_cuda_aware

            cuda_aware = mpi_cuda_aware()
        self.cuda_aware = bool(cuda_aware)
        self._dpool = self._hpool = None
        self._pending = None  # (device recv view, host recv view) of the step in flight
        self._arrived = None  # pool byte range [lo, hi) the last staged message brought (pinned = device)
        self._copy_stream = self._new_stream()

    # ---- device calls (one place; tests replace them with host stand-ins) -----------------------
    def _array_module(self):
        import cupy  # noqa: PLC0415 - only when no array module was given

        return cupy

    def _new_stream(self):
        return self.xp.cuda.Stream(non_blocking=True)

    def _pinned(self, nbytes):
        mem = self.xp.cuda.alloc_pinned_memory(nbytes)
        return np.frombuffer(mem, dtype=np.uint8, count=nbytes)

    def _ptr(self, a):
        return a.data.ptr

    def _memcpy(self, dst_ptr, src_ptr, nbytes, kind):
        self.xp.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, kind, self._copy_stream.ptr)

    def _copy_after_compute(self):
        """The copy stream waits for the compute (current) stream's queued work."""
        self._copy_stream.wait_event(self.xp.cuda.get_current_stream().record())

    def _compute_after_copy(self):
        self.xp.cuda.get_current_stream().wait_event(self._copy_stream.record())

    def _sync_copy(self):
        self._copy_stream.synchronize()

    def _sync_compute(self):
        self.xp.cuda.get_current_stream().synchronize()

    def _compute_done_event(self):
        return self.xp.cuda.get_current_stream().record()

    # ---- transport --------------------------------------------------------------------------
    def alloc(self, shape, dtype):
        """Two device buffers of `shape` carved from one pool kept across calls (and, when staging,
        a pinned host pool of the same size)."""
        dtype = np.dtype(dtype)
        n = int(np.prod(shape)) * dtype.itemsize
        if self._dpool is None or self._dpool.nbytes < 2 * n:
            self._dpool = self._hpool = self._arrived = None
            self._dpool = self.xp.empty(2 * n, dtype=np.uint8)
            if not self.cuda_aware:
                self._hpool = self._pinned(2 * n)
        return tuple(self._dpool[i * n:(i + 1) * n].view(dtype).reshape(shape) for i in (0, 1))

    def release(self):
        self._dpool = self._hpool = self._arrived = None

    def _host_view(self, dev):
        """The pinned bytes that mirror a contiguous view of the device pool."""
        if not dev.flags.c_contiguous:
            raise ValueError("ringattn transport: send/recv must be contiguous slices of the buffers")
        off = self._ptr(dev) - self._ptr(self._dpool)
        if not 0 <= off <= self._dpool.nbytes - dev.nbytes:
            raise ValueError("ringattn transport: send/recv must be views of buffers from alloc()")
        return self._hpool[off:off + dev.nbytes]

    def start(self, send, recv, unchanged=0):
        """Post the step's messages. `unchanged`: how many leading bytes of `send` arrived through
        this transport's last wait() and were not modified on the device since (the ring forwards
        a block it only read). When staging, their pinned copy is sent as it is and only the rest is
        copied device -> host, so a forwarded block costs no second device -> host copy."""
        if self._reqs:
            raise RuntimeError("ringattn transport: previous step's messages were not completed")
        if self.cuda_aware:
            self._sync_compute()  # `send` is complete in device memory before MPI reads it
            self._reqs = [self.comm.Irecv(recv, source=self.src, tag=7), self.comm.Isend(send, dest=self.dst, tag=7)]
            return
        hs, hr = self._host_view(send), self._host_view(recv)
        if unchanged:
            self._check_arrived(send, unchanged)
        self._arrived = None
        if send.nbytes > unchanged:
            self._copy_after_compute()
            self._memcpy(hs.ctypes.data + unchanged, self._ptr(send) + unchanged, send.nbytes - unchanged, _D2H)
            self._sync_copy()  # the bytes are in host memory before Isend
        self._reqs = [self.comm.Irecv(hr, source=self.src, tag=7), self.comm.Isend(hs, dest=self.dst, tag=7)]
        self._pending = (recv, hr)

    def _check_arrived(self, send, unchanged):
        """The pinned mirror holds `unchanged` bytes of `send` only if the last message brought them."""
        off = self._ptr(send) - self._ptr(self._dpool)
        lo, hi = self._arrived or (0, 0)
        if not (0 <= unchanged <= send.nbytes and lo <= off and off + unchanged <= hi):
            raise ValueError(f"ringattn transport: unchanged={unchanged} bytes at pool offset {off} did not arrive "
                             f"with the last message (it brought bytes [{lo}, {hi}))")

    def overlap(self, fn):
        """Launch fn's kernels, then keep the messages moving until the GPU has finished them."""
        c0 = time.thread_time()
        try:
            result = fn()
            done = self._compute_done_event()
            while not done.done:
                if self._reqs and self.progress != "none":  # this thread polls: "thread" and "chunks" alike
                    self.test()
                time.sleep(self.poll_s)
            return result
        finally:
            self.compute_cpu_s += time.thread_time() - c0

    def wait(self):
        super().wait()
        if self._pending is not None:
            recv, hr = self._pending
            self._pending = None
            self._memcpy(self._ptr(recv), hr.ctypes.data, recv.nbytes, _H2D)
            self._compute_after_copy()  # later kernels on the compute stream see the received block
            off = self._ptr(recv) - self._ptr(self._dpool)
            self._arrived = (off, off + recv.nbytes)  # these pinned bytes now mirror the device bytes
