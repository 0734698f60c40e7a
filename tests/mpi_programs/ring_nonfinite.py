"""Ring attention keeps NaN and Inf: every output that sees a bad value of q, k or v is non-finite.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_nonfinite.py [seed]

For every layout, causal and not, forward and backward: full q, k, v, dout drawn from one seed on
every rank (sizes too), 1-3 bad values (NaN, +Inf, -Inf) at random places, each rank's shards
through Ring.attention_forward / attention_backward, gathered with unshard and compared with the
float64 row-by-row reference (tests/nonfinite_ref.py: which outputs see a bad value). Rank 0 prints
one line per case and "ok" at the end; any failed case makes every rank exit 1.
"""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared reference helpers
import ringattn  # noqa: E402
from nonfinite_ref import check, missed, poison, row_reference, rows_of, visibility  # noqa: E402

LAYOUTS = ("contiguous", "zigzag", "striped")
TRIALS = 3  # per layout and causal; the first one also has a NaN key in the first half (see draw_case)
TOL = {np.float32: 1e-5, np.float64: 1e-12}


def draw_case(rng, P, early_key):
    """Sizes, inputs (float32 or float64) and bad values, the same on every rank (same seed).
    early_key: one more NaN in k in the first half of the sequence, so that the block holding it is
    merged before blocks without it (the order that lost it) at every P, even P = 1 (zigzag)."""
    S = int(rng.integers(max(P, 3), 70))
    b, (h, hk), d = int(rng.integers(1, 3)), [(2, 1), (2, 2), (4, 2)][int(rng.integers(3))], int(rng.integers(1, 40))
    dtype = np.float64 if rng.integers(4) == 0 else np.float32
    q, k, v, dout = (rng.standard_normal(s).astype(dtype) for s in ((b, S, h, d), (b, S, hk, d), (b, S, hk, d),
                                                                    (b, S, h, d)))
    placed = poison(rng, [q, k, v])
    if early_key:
        idx = (int(rng.integers(b)), int(rng.integers(S // 2)), int(rng.integers(hk)), int(rng.integers(d)))
        k[idx] = np.nan
        placed.append(("k", idx, float("nan")))
    return (q, k, v, dout), placed


def run_ring(ring, arrays, causal):
    q, k, v, dout = (ring.shard(a) for a in arrays)
    out, lse = ring.attention_forward(q, k, v, causal=causal)
    grads = ring.attention_backward(dout, q, k, v, out, lse, causal=causal)
    return [ring.unshard(out), ring.unshard(lse, axis=2), *(ring.unshard(g) for g in grads)]


def main():
    comm = MPI.COMM_WORLD
    P, rank = comm.Get_size(), comm.Get_rank()
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else comm.bcast(int(np.random.SeedSequence().entropy % 2**63))
    rng = np.random.default_rng(seed)
    failures = []
    for layout in LAYOUTS:
        ring = ringattn.Ring(comm, layout=layout)
        for causal in (False, True):
            for trial in range(TRIALS):
                arrays, placed = draw_case(rng, P, early_key=trial == 0)
                q, k, v, dout = arrays
                pos = np.arange(q.shape[1])
                with np.errstate(all="ignore"):
                    ref = row_reference(q, k, v, visibility(pos, pos, causal), 1.0 / np.sqrt(q.shape[-1]), dout)
                    got = run_ring(ring, arrays, causal)
                what = f"P={P} {layout} causal={causal} S={q.shape[1]} {q.dtype} bad={placed}"
                lost = {n: rows_of(missed(g, r)) for n, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref)}
                try:
                    v_bad = any(name == "v" for name, _, _ in placed)
                    for n, g, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
                        check(g, r, TOL[q.dtype.type], f"{n} {what}", exact_set=(n == "lse" or (n == "out" and not v_bad)))
                    status = "ok"
                except AssertionError as e:
                    failures.append(str(e))
                    status = "FAIL"
                if rank == 0:
                    print(f"{status} {what} rows that lost a bad value: {lost}", flush=True)
    if rank == 0:
        print(f"seed {seed}: {len(failures)} failed cases" + "".join(f"\n  {f}" for f in failures), flush=True)
        if not failures:
            print("ok", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
