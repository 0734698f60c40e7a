"""Ranks that keep calling the Ring until a peer stops: the watchdog must end the job.

    RINGATTN_WATCHDOG_S=2 mpiexec -n P python -m mpi4py tests/mpi_programs/ring_stuck_peer.py DIR [CALL]

Each rank writes its pid to DIR/rank<r>.pid, then loops over Ring calls (CALL: forward (default),
backward or unshard) and, after its first completed call, writes DIR/rank<r>.ready. The test stops
one rank with SIGSTOP; the others then wait in a ring step or the argument agreement until the
watchdog prints its line and aborts the job. Runs until killed when no rank is stopped.
"""
import os
import sys

import numpy as np

import ringattn
from mpi4py import MPI

comm = MPI.COMM_WORLD
out_dir = sys.argv[1]
call = sys.argv[2] if len(sys.argv) > 2 else "forward"
with open(os.path.join(out_dir, f"rank{comm.rank}.pid"), "w") as f:
    f.write(str(os.getpid()))

ring = ringattn.Ring(comm, layout="zigzag")
x = ring.shard(np.random.default_rng(0).standard_normal((1, 64 * comm.size, 2, 16)).astype(np.float32))
out, lse = ring.attention_forward(x, x, x, causal=True)
calls = {"forward": lambda: ring.attention_forward(x, x, x, causal=True),
         "backward": lambda: ring.attention_backward(x, x, x, x, out, lse, causal=True),
         "unshard": lambda: ring.unshard(x)}
n = 0
while True:
    calls[call]()
    n += 1
    if n == 1:
        with open(os.path.join(out_dir, f"rank{comm.rank}.ready"), "w") as f:
            f.write("1")
