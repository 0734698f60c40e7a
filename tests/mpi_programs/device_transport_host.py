"""DeviceTransport's ring pattern with host stand-ins for the device calls (run by
tests/test_cuda_transport.py; by hand: mpiexec -n 3 python -m mpi4py tests/mpi_programs/device_transport_host.py).
Prints "ok RANK" on every rank when every check passed."""
import ctypes, sys
import numpy as np
from mpi4py import MPI
from ringattn.transport_cuda import DeviceTransport

class Event:
    def __init__(self, polls):  # reports done after a few polls, like a kernel still running
        self.left = polls
    @property
    def done(self):
        self.left -= 1
        return self.left < 0

class HostStandIn(DeviceTransport):
    copies = []
    def _array_module(self):
        return np
    def _new_stream(self):
        return None
    def _pinned(self, nbytes):
        return np.full(nbytes, 0xEE, np.uint8)  # poisoned
    def _ptr(self, a):
        return a.__array_interface__["data"][0]
    def _memcpy(self, dst, src, nbytes, kind):
        self.copies.append(kind)
        ctypes.memmove(dst, src, nbytes)
    def _copy_after_compute(self): pass
    def _compute_after_copy(self): pass
    def _sync_copy(self): pass
    def _sync_compute(self): pass
    def _compute_done_event(self):
        return Event(3)

comm = MPI.COMM_WORLD
r, n = comm.Get_rank(), comm.Get_size()
src, dst = (r - 1) % n, (r + 1) % n
for aware in (False, True):
    t = HostStandIn(comm, src, dst, cuda_aware=aware)
    cur, nxt = t.alloc((4, 3, 5), np.float32)
    assert cur.base is not None and nxt.base is not None
    cur[...] = r
    nxt[...] = np.nan
    owner = r
    for step in range(n - 1):  # a full ring pass of planes [0:2], as the forward does
        t.start(cur[0:2], nxt[0:2])
        assert t.overlap(lambda: step) == step
        t.wait()
        owner = (owner - 1) % n
        assert np.all(nxt[0:2] == owner), (aware, step, nxt[0:2])
        cur, nxt = nxt, cur
    # the backward's second message: the gradient planes only
    cur[2:4] = 100 + r
    t.start(cur[2:4], nxt[2:4])
    t.wait()
    assert np.all(nxt[2:4] == 100 + src)
    if not aware:
        assert set(t.copies) == {1, 2} and len(t.copies) == 2 * n
        try:
            t.start(cur[0, ::2], nxt[0, ::2])
            raise AssertionError("non-contiguous slices must be refused")
        except ValueError as e:
            assert "contiguous" in str(e)
sys.stdout.write(f"ok {r}\n"); sys.stdout.flush()  # one write per rank
