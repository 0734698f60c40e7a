"""Long sequence spot check: exact causal zigzag forward over S tokens, sampled query rows of each rank
against a float64 streaming softmax over exactly the keys each row may see (the inputs are generated
chunk by chunk, so no rank holds the whole sequence).

    mpiexec -n 4 python -m mpi4py tests/mpi_programs/ring_long_sequence.py S

Every rank prints "LONG rank <r>: S=... err out ... lse ... OK" (or BAD: relative error >= 1e-5).
"""
import sys
import numpy as np
import ringattn
from mpi4py import MPI

comm = MPI.COMM_WORLD
S, H, D, CH = int(sys.argv[1]), 2, 64, 8192
ring = ringattn.Ring(comm, layout="zigzag")

def rows(name, lo, hi):
    # rows [lo, hi) of a deterministic (1, S, H, D) tensor, generated chunk by chunk
    parts = []
    for c in range(lo // CH, (hi - 1) // CH + 1):
        blk = np.random.default_rng([ord(name), c]).standard_normal((1, CH, H, D), dtype=np.float32)
        a, b = max(lo, c * CH) - c * CH, min(hi, (c + 1) * CH) - c * CH
        parts.append(blk[:, a:b])
    return np.concatenate(parts, axis=1)

def local(name):
    return np.concatenate([rows(name, s, s + n) for _, n, s, _ in ring.segments(S)], axis=1)

q, k, v = local("q"), local("k"), local("v")
comm.Barrier()
t0 = MPI.Wtime()
out, lse = ring.attention_forward(q, k, v, causal=True)
comm.Barrier()
t1 = MPI.Wtime()
pos = ring.positions(S)
rng = np.random.default_rng(comm.rank)
pick = np.sort(rng.choice(len(pos), 12, replace=False))
pick = np.concatenate([[0, len(pos) - 1], pick])  # include the extremes of this rank's shard
qp = pos[pick]
qs = q[0, pick].astype(np.float64)  # (n, H, D)
m = np.full((len(pick), H), -np.inf); l = np.zeros_like(m); acc = np.zeros((len(pick), H, D))
for c in range(0, int(qp.max()) + 1, CH):
    kc = rows("k", c, min(c + CH, S))[0].astype(np.float64)
    vc = rows("v", c, min(c + CH, S))[0].astype(np.float64)
    s = np.einsum("nhd,jhd->nhj", qs, kc) / np.sqrt(D)
    s = np.where((c + np.arange(len(kc)))[None, None, :] <= qp[:, None, None], s, -np.inf)
    mn = np.maximum(m, s.max(-1))
    e = np.exp(s - mn[..., None])
    w = np.where(np.isfinite(m), np.exp(m - mn), 0.0)
    l = l * w + e.sum(-1)
    acc = acc * w[..., None] + np.einsum("nhj,jhd->nhd", e, vc)
    m = mn
ref_out, ref_lse = acc / l[..., None], m + np.log(l)
err_o = np.linalg.norm(out[0, pick] - ref_out) / np.linalg.norm(ref_out)
err_l = np.linalg.norm(lse[0][:, pick].T - ref_lse) / np.linalg.norm(ref_lse)
ok = err_o < 1e-5 and err_l < 1e-5
print(f"LONG rank {comm.rank}: S={S} ring {t1 - t0:.1f}s rows {len(pick)} err out {err_o:.2e} lse {err_l:.2e} {'OK' if ok else 'BAD'}", flush=True)
