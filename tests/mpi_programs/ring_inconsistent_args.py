"""Arguments that differ between ranks (causal, softmax_scale, heads, dtype, lengths, ndim, q/k lengths,
backward lse and causal): every rank raises the same error, fast, and the Ring still works after.

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_inconsistent_args.py

Rank 0 prints "CASE <name> rank <r>: <error>" for every case and rank, then "AFTER rank <r>: True" when
the Ring is still exact afterwards.
"""
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
