"""Two threads share one Ring: every call is exact or (for calls that pair different operations across
ranks) raises the clear different-calls error on both sides; never a hang or a wrong number.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_threads.py [ITERATIONS]

Phase "fwd": both threads call attention_forward; phase "bwd": both call attention_backward (the
threads' calls are identical, so any pairing across ranks is a valid one). Phase "mixed": one thread
calls forward, the other backward; a call paired with the other operation must raise the ValueError.
Prints one line per rank; rank 0 prints ALL-OK when every rank passed.
"""
import sys
import threading

import numpy as np

import ringattn
from ringattn import reference as R
from mpi4py import MPI

comm = MPI.COMM_WORLD
P, rank = comm.size, comm.rank
iters = int(sys.argv[1]) if len(sys.argv) > 1 else 20
ring = ringattn.Ring(comm, layout="zigzag")
assert ring.transport.progress == "thread", ring.transport.progress  # mpi4py's default THREAD_MULTIPLE

S, b, h, hkv, d = 13 * P + 1, 2, 4, 2, 16
rng = np.random.default_rng(11)  # same full arrays on every rank
q = rng.standard_normal((b, S, h, d)).astype(np.float32)
k = rng.standard_normal((b, S, hkv, d)).astype(np.float32)
v = rng.standard_normal((b, S, hkv, d)).astype(np.float32)
do = rng.standard_normal((b, S, h, d)).astype(np.float32)
o_ref, l_ref = R.attention_forward(q, k, v, True, None)
g_ref = R.attention_backward(do, q, k, v, True, None)
ql, kl, vl, dol = (ring.shard(x) for x in (q, k, v, do))
o_loc, l_loc = ring.shard(o_ref), ring.shard(l_ref, axis=2)
g_loc = [ring.shard(g) for g in g_ref]
out, lse = ring.attention_forward(ql, kl, vl, causal=True)  # single-threaded: the backward's inputs
TOL = 1e-5
problems, counts = [], {"ok": 0, "paired-with-other-op": 0}
plock = threading.Lock()


def note(ok=None, problem=None):
    with plock:
        if problem:
            problems.append(problem)
        else:
            counts[ok] += 1


def forward(tag):
    for i in range(iters):
        try:
            o, l = ring.attention_forward(ql, kl, vl, causal=True)
        except ValueError as e:
            if tag == "mixed" and "ranks are in different calls" in str(e):
                note("paired-with-other-op")
                continue
            raise
        errs = R.rel_error(o, o_loc), R.rel_error(l, l_loc)
        if not max(errs) < TOL:
            note(problem=f"{tag} forward call {i}: errors {errs}")
        else:
            note("ok")


def backward(tag):
    for i in range(iters):
        try:
            grads = ring.attention_backward(dol, ql, kl, vl, out, lse, causal=True)
        except ValueError as e:
            if tag == "mixed" and "ranks are in different calls" in str(e):
                note("paired-with-other-op")
                continue
            raise
        errs = [R.rel_error(g, r) for g, r in zip(grads, g_loc)]
        if not max(errs) < TOL:
            note(problem=f"{tag} backward call {i}: errors {errs}")
        else:
            note("ok")


def guarded(fn, tag):
    def run():
        try:
            fn(tag)
        except Exception as e:  # an unexpected error is a failure, reported below
            note(problem=f"{tag} {fn.__name__}: {type(e).__name__}: {e}")
    return run


for tag, fns in (("fwd", (forward, forward)), ("bwd", (backward, backward)), ("mixed", (forward, backward))):
    threads = [threading.Thread(target=guarded(fn, tag)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    comm.Barrier()

expected_calls = 6 * iters
if sum(counts.values()) != expected_calls:
    problems.append(f"{sum(counts.values())} calls accounted for, expected {expected_calls}")
line = f"rank {rank}: {counts} problems: {problems}"
lines = comm.gather(line)
if rank == 0:
    print("\n".join(lines))
    bad = any("problems: []" not in l for l in lines)
    print("THREADS-BAD" if bad else f"ALL-OK threads on {P} ranks", flush=True)
    sys.exit(1 if bad else 0)
