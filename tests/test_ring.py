"""Ring attention under mpiexec: exact vs the float64 reference, bad input, failures.

Many cases run inside ONE mpiexec launch per rank count (launches cost seconds on this machine).
"""
import re
import time

import pytest

from mpi_util import run_file, run_mpi

# Every layout x causal x GQA x uneven length, forward and all three gradients vs float64 reference,
# float32 (< 1e-5) and a float64 subset (< 1e-12). The transport buffers are poisoned with NaN
# bytes before each call so a stale or unwritten region would show up (tests/mpi_programs/ring_exact.py).

@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_exact(P):
    res = run_file(P, "ring_exact.py", timeout=180)
    assert f"ALL-OK 44 cases on {P} ranks" in res.stdout, res.stdout


# NaN/Inf flow through: a NaN query row poisons exactly its own output row; an Inf value poisons every
# query of the heads that read its kv head (non-causal), nothing else; no hang.
NANS = r"""
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
"""


@pytest.mark.parametrize("P", [1, 3])
def test_ring_nan_inf_flow_through(P):
    res = run_mpi(P, NANS, timeout=60)
    assert f"INF-OK on {P} ranks" in res.stdout, res.stdout
    # a NaN query row must stay NaN through every merge, not become an "empty" row (out 0, lse -inf)
    assert "NAN-QUERY-ROW OK" in res.stdout, res.stdout


# Inconsistent arguments: every rank raises the same error, fast, and the ring still works after.
ERRORS = r"""
import numpy as np
import ringattn
from mpi4py import MPI

comm = MPI.COMM_WORLD
r, P = comm.rank, comm.size
ring = ringattn.Ring(comm, layout="zigzag")
S = 10 * P + 1
rng = np.random.default_rng(0)
full = rng.standard_normal((1, S, 2, 8)).astype(np.float32)
x = ring.shard(full)

results = []
def attempt(name, fn):
    try:
        fn()
        msg = "no error"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    results.append(f"CASE {name} rank {r}: {msg}")

attempt("causal", lambda: ring.attention_forward(x, x, x, causal=(r == 0)))
attempt("scale", lambda: ring.attention_forward(x, x, x, softmax_scale=1.0 if r == P - 1 else None))
attempt("heads", lambda: ring.attention_forward(x, x[:, :, :1] if r == 1 else x, x[:, :, :1] if r == 1 else x))
attempt("dtype", lambda: ring.attention_forward(*[x.astype(np.float64) if r == 0 else x] * 3))
y = full[:, :x.shape[1] + (1 if r == 0 else -1 if r == 1 else 0)]
attempt("lengths", lambda: ring.attention_forward(y, y, y))
z = x[0] if r == P - 1 else x
attempt("ndim", lambda: ring.attention_forward(z, z, z))
attempt("qk_len", lambda: ring.attention_forward(x, x[:, :-1] if r == 0 else x, x[:, :-1] if r == 0 else x))
out, lse = ring.attention_forward(x, x, x, causal=True)
attempt("bwd_lse", lambda: ring.attention_backward(x, x, x, x, out, lse[:, :1] if r == 1 else lse, causal=True))
attempt("bwd_causal", lambda: ring.attention_backward(x, x, x, x, out, lse, causal=(r != 0)))
# still usable afterwards
from ringattn import reference as R
o_ref, _ = R.attention_forward(full, full, full, causal=True)
results.append(f"AFTER rank {r}: {R.rel_error(ring.unshard(out), o_ref) < 1e-5}")
results = comm.gather(results)
if r == 0:
    print("\n".join(l for rs in results for l in rs), flush=True)
"""

EXPECT = {
    "causal": ("ValueError", "causal"), "scale": ("ValueError", "softmax_scale"), "heads": ("ValueError", "k/v shape"),
    "dtype": ("ValueError", "dtype"), "lengths": ("ValueError", "do not match the 'zigzag' layout"),
    "ndim": ("ValueError", "expected 4 dimensions"), "qk_len": ("ValueError", "every rank holds as many keys"),
    "bwd_lse": ("ValueError", "lse: shape"), "bwd_causal": ("ValueError", "causal"),
}


@pytest.mark.parametrize("P", [2, 3])
def test_ring_inconsistent_args_same_error_everywhere(P):
    t0 = time.time()
    res = run_mpi(P, ERRORS, timeout=60)
    assert time.time() - t0 < 60
    lines = [l for l in res.stdout.splitlines() if l.startswith("CASE ")]
    for case, (cls, needle) in EXPECT.items():
        msgs = {re.sub(r"^CASE \S+ rank \d+: ", "", l) for l in lines if l.startswith(f"CASE {case} rank ")}
        got = [l for l in lines if l.startswith(f"CASE {case} rank ")]
        assert len(got) == P, (case, res.stdout)
        assert len(msgs) == 1, f"{case}: ranks disagree: {msgs}"  # the SAME error on every rank
        msg = msgs.pop()
        assert msg.startswith(cls + ": ringattn.Ring."), (case, msg)
        assert needle in msg, (case, msg)
    assert all(f"AFTER rank {r}: True" in res.stdout for r in range(P)), res.stdout


# An exception on one rank in the middle of the ring ends the whole job quickly (python -m mpi4py).
FAILING = r"""
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
"""


def test_ring_exception_on_one_rank_aborts_job():
    t0 = time.time()
    res = run_mpi(3, FAILING, timeout=60, check=False)
    assert time.time() - t0 < 60
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert "UNREACHABLE" not in res.stdout


# Long sequence spot check: exact causal forward over 262,144 tokens on 4 ranks, sampled query rows
# against a float64 streaming softmax over exactly the keys each row may see. About 3.5 min on the
# 2-core dev machine; errors ~6e-6 for rows with ~200K visible keys, the same as the single-process
# kernel on those rows (float32 accumulation), so the ring adds none.
LONG = r"""
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
"""


def test_ring_long_sequence_small():
    # the same check at a length the placeholder kernels handle quickly
    res = run_mpi(4, LONG, args=[4 * 2048 + 3], timeout=120)
    assert res.stdout.count("OK") == 4 and "BAD" not in res.stdout, res.stdout


@pytest.mark.slow
def test_ring_long_sequence_262144():
    res = run_mpi(4, LONG, args=[262144], timeout=900)
    print(res.stdout)
    assert res.stdout.count(" OK") == 4 and "BAD" not in res.stdout, res.stdout
