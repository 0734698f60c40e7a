"""Ring attention vs the float64 reference: every layout x causal x GQA x uneven length (run by
tests/test_ring.py::test_ring_exact; by hand: mpiexec -n 3 python -m mpi4py tests/mpi_programs/ring_exact.py)."""
import sys
import numpy as np
import ringattn
from ringattn import reference as R
from mpi4py import MPI

comm = MPI.COMM_WORLD
P = comm.size
rings = {lay: ringattn.Ring(comm, layout=lay) for lay in ("contiguous", "zigzag", "striped")}
fails, ncases = [], 0

def run_case(lay, causal, S, h, hkv, d, dtype, tol, b=2, scale=None):
    global ncases
    ring = rings[lay]
    rng = np.random.default_rng([S, h, hkv, d, int(causal), np.dtype(dtype).itemsize])  # same on every rank
    q = rng.standard_normal((b, S, h, d)).astype(dtype)
    k = rng.standard_normal((b, S, hkv, d)).astype(dtype)
    v = rng.standard_normal((b, S, hkv, d)).astype(dtype)
    do = rng.standard_normal((b, S, h, d)).astype(dtype)
    ql, kl, vl, dol = (ring.shard(x) for x in (q, k, v, do))
    assert ql.shape[1] == ring.local_len(S)
    assert np.array_equal(ring.unshard(ql), q)
    ring.transport._pool.fill(255)  # NaN in float32 and float64
    out, lse = ring.attention_forward(ql, kl, vl, causal=causal, softmax_scale=scale)
    ring.transport._pool.fill(255)
    dq, dk, dv = ring.attention_backward(dol, ql, kl, vl, out, lse, causal=causal, softmax_scale=scale)
    assert out.dtype == dtype and dq.dtype == dtype and dk.shape == kl.shape and dv.shape == vl.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    o_ref, l_ref = R.attention_forward(q, k, v, causal, scale)
    g_ref = R.attention_backward(do, q, k, v, causal, scale)
    got = [ring.unshard(out), ring.unshard(lse, axis=2)] + [ring.unshard(g) for g in (dq, dk, dv)]
    errs = [R.rel_error(x, y) for x, y in zip(got, [o_ref, l_ref, *g_ref])]
    ncases += 1
    if not all(e < tol for e in errs):  # also catches NaN
        fails.append(f"{lay} causal={causal} S={S} h={h} hkv={hkv} d={d} {np.dtype(dtype).name}: "
                     f"errors out/lse/dq/dk/dv = {['%.2e' % e for e in errs]}")

for lay in rings:
    for causal in (False, True):
        for S in sorted({P, 2 * P + 1, 97}):
            for h, hkv in ((4, 4), (4, 2)):
                run_case(lay, causal, S, h, hkv, 16, np.float32, 1e-5)
        run_case(lay, causal, 37 + P, 3, 1, 59, np.float64, 1e-12, b=1)
run_case("zigzag", True, 64, 2, 1, 1, np.float32, 1e-5, scale=0.3)      # head dim 1, explicit scale
run_case("striped", False, 4 * P + 3, 2, 2, 128, np.float32, 1e-5, b=1)  # head dim 128

fails = comm.gather(fails)  # print from rank 0 only: lines from several ranks interleave
if comm.rank == 0:
    bad = [f"rank {r}: {f}" for r, fs in enumerate(fails) for f in fs]
    print("\n".join(bad) if bad else f"ALL-OK {ncases} cases on {P} ranks", flush=True)
    sys.exit(1 if bad else 0)
