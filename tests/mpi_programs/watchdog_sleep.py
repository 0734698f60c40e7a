"""A guarded body that outlasts the watchdog, and guarded bodies that do not.

    RINGATTN_WATCHDOG_S=0.5 mpiexec -n P python -m mpi4py tests/mpi_programs/watchdog_sleep.py SHORT LONG

Every rank first runs several guarded sleeps of SHORT seconds each (together longer than the
timeout, each shorter: none may fire), prints "SHORT-OK rank <r>", then rank 0 sleeps LONG seconds
inside guard("Test.sleep", "ring step 2 of 4"), which must abort the whole job (the other ranks wait
in a barrier). "UNREACHABLE" must never be printed.
"""
import sys
import time

from mpi4py import MPI

from ringattn import watchdog

short, long_ = float(sys.argv[1]), float(sys.argv[2])
comm = MPI.COMM_WORLD
for _ in range(max(3, int(2 * watchdog.timeout_s() / short) + 1)):
    with watchdog.guard("Test.short", 1):
        time.sleep(short)
print(f"SHORT-OK rank {comm.rank}", flush=True)
comm.Barrier()
if comm.rank == 0:
    with watchdog.guard("Test.sleep", "ring step 2 of 4"):
        time.sleep(long_)
comm.Barrier()
print("UNREACHABLE", flush=True)
