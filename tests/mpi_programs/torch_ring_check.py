"""ringattn.torch.ring_attention under mpiexec, against one-process torch SDPA (computed on every rank).

    mpiexec -n P python -m mpi4py tests/mpi_programs/torch_ring_check.py

For every layout, causal and not, GQA (4 heads, 2 kv heads), a total length that does not divide
evenly: the local out and dq/dk/dv (autograd through the op) equal SDPA's on this rank's positions,
float64 below 1e-10 and float32 below 1e-5 of the float64 reference; unshard(out) is the full output. A refusal on one rank
(window_size, a bfloat16 CPU tensor) is the same error on every rank.
Then torch.autograd.gradcheck (float64) of shard -> ring_attention -> unshard as a function of the
full tensors held by every rank. Prints "ok rank R" on success.
"""
import sys

import torch
import torch.nn.functional as F
from mpi4py import MPI

import ringattn
import ringattn.torch as rt

LAYOUTS = ("contiguous", "zigzag", "striped")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1.0))


def sdpa(q, k, v, causal):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def full_inputs(shape_q, shape_kv, seed):
    g = torch.Generator().manual_seed(seed)  # the same tensors on every rank
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv, shape_q)]


def check_against_sdpa(ring, layout, causal, dtype, tol):
    total = 3 * ring.size + 2 if ring.size > 1 else 13  # uneven shards
    q, k, v, dout = full_inputs((2, total, 4, 5), (2, total, 2, 5), seed=17 + causal)
    ref_q, ref_k, ref_v = (x.clone().requires_grad_() for x in (q, k, v))
    ref = sdpa(ref_q, ref_k, ref_v, causal)
    ref.backward(dout)
    local = [rt.shard(x, ring).to(dtype).requires_grad_() for x in (q, k, v)]
    out = rt.ring_attention(*local, ring, causal=causal)
    out.backward(rt.shard(dout, ring).to(dtype))
    errs = {"out": rel(out, rt.shard(ref, ring))}
    for name, x, r in zip(("dq", "dk", "dv"), local, (ref_q, ref_k, ref_v)):
        assert x.grad.dtype == dtype
        errs[name] = rel(x.grad, rt.shard(r.grad, ring))
    errs["unshard(out)"] = rel(rt.unshard(out, ring), ref)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"rank {ring.rank} {layout} causal={causal} {dtype}: {bad} (tolerance {tol})"
    return max(errs.values())


class _MeanOverRanks(torch.autograd.Function):
    """Identity forward; backward averages the gradient over the ring (every rank holds the same
    full input, as gradcheck perturbs it in lockstep on every rank)."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        total = g.contiguous().numpy().copy()
        ctx.comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        return torch.from_numpy(total) / ctx.comm.Get_size(), None


def check_gradcheck(ring, causal):
    total = ring.size + 3
    q, k, v, _ = full_inputs((1, total, 2, 3), (1, total, 1, 3), seed=5)

    def f(q, k, v):
        local = [rt.shard(_MeanOverRanks.apply(x, ring.comm), ring) for x in (q, k, v)]
        return rt.unshard(rt.ring_attention(*local, ring, causal=causal, softmax_scale=0.8), ring)

    # fast_mode: one random direction per input (seeded alike on every rank, so the ranks agree).
    torch.manual_seed(3)
    ok = torch.autograd.gradcheck(f, tuple(x.requires_grad_() for x in (q, k, v)), eps=1e-6, atol=1e-8, rtol=1e-6,
                                  fast_mode=True)
    assert ok, f"rank {ring.rank}: gradcheck failed ({ring.layout}, causal={causal})"


def check_one_rank_refusal(ring):
    """A refusal on one rank (a malformed window on the last rank, or a bfloat16 CPU tensor there) is the same
    error on every rank, naming that rank, instead of a hang."""
    q, k, v, _ = full_inputs((1, 2 * ring.size, 2, 4), (1, 2 * ring.size, 2, 4), seed=9)
    q, k, v = (rt.shard(x, ring) for x in (q, k, v))
    last = ring.rank == ring.size - 1
    for kwargs, bad_q, cls, words in ((dict(window_size=3 if last else (-1, -1)), q, TypeError,
                                       "window_size must be a (left, right) pair"),
                                      ({}, q.to(torch.bfloat16) if last else q, TypeError, "bfloat16 on the CPU")):
        try:
            rt.ring_attention(bad_q, k, v, ring, **kwargs)
        except cls as e:
            assert str(e).startswith(f"on rank {ring.size - 1}: ") and words in str(e), str(e)
        else:
            raise AssertionError(f"rank {ring.rank}: no {cls.__name__} for {words}")


def main():
    comm = MPI.COMM_WORLD
    check_one_rank_refusal(ringattn.Ring(comm))
    worst = {torch.float64: 0.0, torch.float32: 0.0}
    for layout in LAYOUTS:
        ring = ringattn.Ring(comm, layout=layout)
        for causal in (False, True):
            for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
                worst[dtype] = max(worst[dtype], check_against_sdpa(ring, layout, causal, dtype, tol))
            check_gradcheck(ring, causal)
    if comm.rank == 0:
        print(f"P={comm.size}: worst relative error float64 {worst[torch.float64]:.2e}, "
              f"float32 {worst[torch.float32]:.2e}; gradcheck passed for every layout, causal and not")
    print(f"ok rank {comm.rank}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
