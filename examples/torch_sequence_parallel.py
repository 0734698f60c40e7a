# mpiexec -n 2 python -m mpi4py examples/torch_sequence_parallel.py
import torch
import torch.nn.functional as F
from mpi4py import MPI

import ringattn
import ringattn.torch as rt

ring = ringattn.Ring(MPI.COMM_WORLD, layout="zigzag")
torch.manual_seed(0)  # the same initial weights (and data) on every rank
emb, pos, qkv, head = (torch.nn.Embedding(100, 64), torch.nn.Embedding(1024, 64),
                       torch.nn.Linear(64, 3 * 64), torch.nn.Linear(64, 100))
params = [p for m in (emb, pos, qkv, head) for p in m.parameters()]
opt = torch.optim.AdamW(params, lr=3e-3)
tokens = torch.randint(0, 100, (2, 1025))
x_ids, y_ids = rt.shard(tokens[:, :-1], ring), rt.shard(tokens[:, 1:], ring)  # this rank's tokens
where = rt.positions(ring, 1024)  # their global positions
for step in range(5):
    x = emb(x_ids) + pos(where)
    q, k, v = qkv(x).unflatten(-1, (3, 4, 16)).unbind(2)  # (batch, local seq, 4 heads, 16)
    logits = head(x + rt.ring_attention(q, k, v, ring, causal=True).flatten(2))
    loss = F.cross_entropy(logits.flatten(0, 1), y_ids.flatten(), reduction="sum") / tokens[:, 1:].numel()
    opt.zero_grad()
    loss.backward()
    rt.allreduce_grads(params, ring)  # the sum over ranks: the whole sequence's gradient
    opt.step()
    total = ring.comm.allreduce(loss.item())
    if ring.rank == 0:
        print(f"step {step}: loss {total:.4f}")
