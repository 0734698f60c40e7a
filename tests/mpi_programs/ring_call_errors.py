"""Ring calls that cannot work give the same clear error on every rank, quickly (no hang).

    mpiexec -n P python -m mpi4py tests/mpi_programs/ring_call_errors.py

Ranks in different calls: rank 0 in attention_backward while the others are in attention_forward;
the last rank in unshard while the others are in attention_forward; rank 0 in attention_forward
while the others are in unshard. Bad arguments on one rank (checked by api.check_backward_args, the
single-process rules): an integer or float64 lse, a list dout/out, a string or bool softmax_scale.
Rank 0 prints "CASE <name> rank <r>: <error>" for every rank; then the Ring must still be exact.
"""
import numpy as np

import ringattn
from ringattn import reference as R
from mpi4py import MPI

comm = MPI.COMM_WORLD
r, P = comm.rank, comm.size
ring = ringattn.Ring(comm, layout="zigzag")
S = 10 * P + 1
full = np.random.default_rng(0).standard_normal((1, S, 2, 8)).astype(np.float32)
x = ring.shard(full)
out, lse = ring.attention_forward(x, x, x, causal=True)

lines = []


def attempt(name, fn):
    try:
        fn()
        msg = "no error"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}"
    lines.append(f"CASE {name} rank {r}: {msg}")


attempt("bwd_vs_fwd", lambda: ring.attention_backward(x, x, x, x, out, lse, causal=True) if r == 0
        else ring.attention_forward(x, x, x, causal=True))
attempt("unshard_vs_fwd", lambda: ring.unshard(out) if r == P - 1 else ring.attention_forward(x, x, x, causal=True))
attempt("fwd_vs_unshard", lambda: ring.attention_forward(x, x, x) if r == 0 else ring.unshard(out))
one = r == P - 1  # the one rank with the bad argument
attempt("bwd_lse_int", lambda: ring.attention_backward(x, x, x, x, out, lse.astype(np.int32) if one else lse))
attempt("bwd_lse_f64", lambda: ring.attention_backward(x, x, x, x, out, lse.astype(np.float64) if one else lse))
attempt("bwd_dout_list", lambda: ring.attention_backward(x.tolist() if one else x, x, x, x, out, lse))
attempt("bwd_out_list", lambda: ring.attention_backward(x, x, x, x, out.tolist() if one else out, lse))
attempt("bwd_lse_list", lambda: ring.attention_backward(x, x, x, x, out, lse.tolist() if one else lse))
attempt("fwd_scale_str", lambda: ring.attention_forward(x, x, x, softmax_scale="0.5" if one else 0.5))
attempt("bwd_scale_bool", lambda: ring.attention_backward(x, x, x, x, out, lse, softmax_scale=True if one else 1.0))
o_ref, _ = R.attention_forward(full, full, full, causal=True)
lines.append(f"AFTER rank {r}: {R.rel_error(ring.unshard(ring.attention_forward(x, x, x, causal=True)[0]), o_ref) < 1e-5}")
lines = comm.gather(lines)
if r == 0:
    print("\n".join(l for ls in lines for l in ls), flush=True)
