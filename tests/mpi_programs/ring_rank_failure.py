"""An exception on one rank in the middle of the ring ends the whole job quickly (python -m mpi4py aborts
the world): rank 1's CPU forward kernel raises at ring step 1.

    mpiexec -n 3 python -m mpi4py tests/mpi_programs/ring_rank_failure.py

Expected: a non-zero exit, "injected failure on rank 1" on stderr, and never "UNREACHABLE" on stdout.
"""
import numpy as np
import ringattn
from ringattn.backends import cpu
from mpi4py import MPI

comm = MPI.COMM_WORLD
ring = ringattn.Ring(comm, layout="contiguous")
x = np.random.default_rng(0).standard_normal((1, 64 * comm.size, 2, 8)).astype(np.float32)
calls = [0]
real = cpu.forward  # the Ring calls its backend's kernels
def boom(*a, **kw):
    calls[0] += 1
    if comm.rank == 1 and calls[0] == 2:
        raise RuntimeError("injected failure on rank 1 at ring step 1")
    return real(*a, **kw)
cpu.forward = boom
xl = ring.shard(x)
for _ in range(3):
    ring.attention_forward(xl, xl, xl)
print("UNREACHABLE", flush=True)
