"""MPI initialised below MPI_THREAD_MULTIPLE: the Ring must not call MPI from a helper thread.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_serialized.py [LEVEL]

LEVEL (default serialized) is set through mpi4py.rc before MPI is imported. The default progress
("thread") and an explicit progress="thread" fall back to "chunks" (Testall between kernel calls, on
the calling thread); the results stay exact against the float64 reference. Rank 0 prints ALL-OK.
"""
import sys
import threading

import mpi4py

mpi4py.rc.thread_level = sys.argv[1] if len(sys.argv) > 1 else "serialized"
from mpi4py import MPI  # noqa: E402  (after rc, on purpose)

import numpy as np  # noqa: E402

import ringattn  # noqa: E402
from ringattn import reference as R  # noqa: E402
from ringattn.transport import HostTransport  # noqa: E402

comm = MPI.COMM_WORLD
P, rank = comm.size, comm.rank
assert MPI.Query_thread() < MPI.THREAD_MULTIPLE, MPI.Query_thread()

# Spies: no MPI call may come from a thread other than the main one, and "chunks" must poll.
main = threading.main_thread()
calls = {"test": 0, "other-thread": 0, "helper-thread": 0}
real_test, real_thread = HostTransport.test, HostTransport._overlap_thread


def test_spy(self):
    calls["test"] += 1
    if threading.current_thread() is not main:
        calls["other-thread"] += 1
    return real_test(self)


def thread_spy(self, fn):
    calls["helper-thread"] += 1
    return real_thread(self, fn)


HostTransport.test, HostTransport._overlap_thread = test_spy, thread_spy

problems = []
rings = {"default": ringattn.Ring(comm, layout="zigzag"), "thread": ringattn.Ring(comm, layout="striped", progress="thread"),
         "none": ringattn.Ring(comm, layout="contiguous", progress="none")}
want_mode = {"default": "chunks", "thread": "chunks", "none": "none"}
for name, ring in rings.items():
    if ring.transport.progress != want_mode[name]:
        problems.append(f"{name}: progress {ring.transport.progress!r}, expected {want_mode[name]!r}")

S, b, h, hkv, d = 7 * P + 2, 2, 4, 2, 16
rng = np.random.default_rng(5)
q = rng.standard_normal((b, S, h, d))
k = rng.standard_normal((b, S, hkv, d))
v = rng.standard_normal((b, S, hkv, d))
do = rng.standard_normal((b, S, h, d))
for causal in (False, True):
    o_ref, l_ref = R.attention_forward(q, k, v, causal, None)
    g_ref = R.attention_backward(do, q, k, v, causal, None)
    for name, ring in rings.items():
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
            ql, kl, vl, dol = (ring.shard(x.astype(dtype)) for x in (q, k, v, do))
            out, lse = ring.attention_forward(ql, kl, vl, causal=causal)
            grads = ring.attention_backward(dol, ql, kl, vl, out, lse, causal=causal)
            got = [ring.unshard(out), ring.unshard(lse, axis=2)] + [ring.unshard(g) for g in grads]
            errs = [R.rel_error(x, y) for x, y in zip(got, [o_ref, l_ref, *g_ref])]
            if not max(errs) < tol:
                problems.append(f"{name} causal={causal} {np.dtype(dtype).name}: errors {errs}")

if calls["other-thread"] or calls["helper-thread"]:
    problems.append(f"MPI called from a helper thread: {calls}")
if P > 1 and calls["test"] == 0:
    problems.append("chunks mode never polled")
lines = comm.gather(f"rank {rank}: {calls} problems: {problems}")
if rank == 0:
    print("\n".join(lines))
    bad = any("problems: []" not in l for l in lines)
    print("SERIALIZED-BAD" if bad else f"ALL-OK serialized on {P} ranks", flush=True)
    sys.exit(1 if bad else 0)
