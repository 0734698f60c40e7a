"""Sliding-window ring attention equals the float64 reference, and skips the ring steps nobody needs.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_window.py [seed]

For every layout, causal and not, windows of 0, 1, shorter than a shard, about a shard, longer than
the sequence, one-sided and two-sided: full q, k, v, dout drawn from one seed on every rank (uneven
lengths, GQA), each rank's shards through Ring.attention_forward / attention_backward with
window_size, gathered with unshard and compared with ringattn.reference (float32: rel error < 1e-5).
The number of ring steps run (ring.last_steps) must equal ringattn.mask.ring_steps, and with the
contiguous layout and a causal window shorter than a shard it must be 2 (own block and the previous
rank's). Rank 0 prints one line per case and "ok" at the end; a failed case makes every rank exit 1.
"""
import sys

import numpy as np
from mpi4py import MPI

import ringattn
from ringattn import reference as R
from ringattn.mask import Mask, ring_steps

LAYOUTS = ("contiguous", "zigzag", "striped")
TOL = 1e-5


def windows(S, P):
    shard = S // P
    return [(0, 0), (1, -1), (0, -1), (max(1, shard // 3), -1), (shard, 2), (3, max(1, shard // 2)), (-1, 1),
            (S + 5, S + 5)]


def main():
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else comm.bcast(int(np.random.SeedSequence().entropy % 2**63))
    rng = np.random.default_rng(seed)
    failures = []
    for layout in LAYOUTS:
        ring = ringattn.Ring(comm, layout=layout)
        S = int(rng.integers(max(P, 2) * 9, max(P, 2) * 20))  # uneven shards
        b, (h, hk), d = 1, [(2, 1), (2, 2), (4, 2)][int(rng.integers(3))], int(rng.integers(3, 20))
        q, k, v, dout = (rng.standard_normal(s).astype(np.float32) for s in ((b, S, h, d), (b, S, hk, d),
                                                                            (b, S, hk, d), (b, S, h, d)))
        shards = [ring.shard(a) for a in (q, k, v, dout)]
        for causal in (False, True):
            for w in windows(S, P):
                out, lse = ring.attention_forward(*shards[:3], causal=causal, window_size=w)
                fwd_steps = ring.last_steps
                grads = ring.attention_backward(shards[3], *shards[:3], out, lse, causal=causal, window_size=w)
                got = [ring.unshard(out), ring.unshard(lse, axis=2), *(ring.unshard(g) for g in grads)]
                ref = [*R.attention_forward(q, k, v, causal, window_size=w),
                       *R.attention_backward(dout, q, k, v, causal, window_size=w)]
                what = f"P={P} {layout} S={S} h={h}/{hk} d={d} causal={causal} window={w}"
                errs = []
                for name, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
                    fin = np.isfinite(r)
                    if not np.array_equal(fin, np.isfinite(g)) or not np.array_equal(g[~fin], r[~fin]):
                        errs.append(f"{name}: non-finite elements differ")
                    elif fin.any() and R.rel_error(g[fin], r[fin]) >= TOL:
                        errs.append(f"{name}: rel error {R.rel_error(g[fin], r[fin]):.2e}")
                want = ring_steps(Mask.of(causal, w), S, P, layout)
                if fwd_steps != want or ring.last_steps != want:
                    errs.append(f"steps fwd {fwd_steps} bwd {ring.last_steps}, expected {want}")
                if layout == "contiguous" and causal and P > 1 and 1 <= w[0] < S // P - 1 and want != 2:
                    errs.append(f"a causal window of {w[0]} < shard ran {want} steps, expected 2")
                if errs:
                    failures.append(f"{what}: " + "; ".join(errs))
                if rank == 0:
                    print(f"{'FAIL' if errs else 'ok'} {what} steps={want} {'; '.join(errs)}", flush=True)
    if rank == 0:
        print(f"seed {seed}: {len(failures)} failed cases" + "".join(f"\n  {f}" for f in failures), flush=True)
        if not failures:
            print("ok", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
