"""NaN/Inf flow through the Ring: a NaN query row poisons exactly its own output row (it must stay NaN
through every merge, not become an "empty" row with out 0, lse -inf); an Inf value poisons every query of
the heads that read its kv head (non-causal), nothing else; no hang.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_nan_inf.py

Rank 0 prints "INF-OK on P ranks" (or the mismatches) and "NAN-QUERY-ROW OK" (or "FINITE").
"""
import numpy as np
import ringattn
from mpi4py import MPI

comm = MPI.COMM_WORLD
P = comm.size
ring = ringattn.Ring(comm, layout="zigzag")
fails = []
S = 6 * P + 1
rng = np.random.default_rng(5)
q, k, v = (rng.standard_normal((1, S, hh, 8)).astype(np.float32) for hh in (4, 2, 2))
q[0, S // 2, 1, 0] = np.nan
v[0, 0, 1, 3] = np.inf
out, lse = ring.attention_forward(*(ring.shard(x) for x in (q, k, v)))
out = ring.unshard(out)
bad = (~np.isfinite(out)).any(axis=-1)  # (1, S, heads)
expect = np.zeros_like(bad)
expect[0, S // 2, 1] = True
expect[0, :, 2:] = True  # heads 2 and 3 read kv head 1 (GQA group of 2)
nanq = bool(bad[0, S // 2, 1])  # the NaN query row, checked separately
bad[0, S // 2, 1] = expect[0, S // 2, 1] = False
if not np.array_equal(bad, expect):
    fails.append(f"NaN/Inf propagation: (batch, row, head) should be non-finite but are finite: "
                 f"{np.argwhere(expect & ~bad).tolist()}; should be finite but are not: {np.argwhere(bad & ~expect).tolist()}")
fails = comm.gather(fails)
if comm.rank == 0:
    print("; ".join(f for fs in fails for f in fs) or f"INF-OK on {P} ranks", flush=True)
    print(f"NAN-QUERY-ROW {'OK' if nanq else 'FINITE'}", flush=True)
