"""Data + sequence parallel training of a tiny torch model with ringattn.torch.ring_attention, gradients
summed by ringattn.torch.allreduce_grads (no DDP), against the same model with torch SDPA on one process.

    mpiexec -n P python -m mpi4py tests/mpi_programs/torch_train_step.py [--steps 20] [--sp S]

The world splits into P/S rings of S ranks (sequence parallel); ring i trains on batch rows of its own
(data parallel). Each rank's loss is its tokens' summed cross-entropy over the number of tokens of the
whole batch, so the gradients summed over the world are the whole batch's mean-loss gradient. Every
rank also trains the one-process reference (full batch, full sequence, SDPA) and compares the loss of
every step and the final parameters (float64, relative difference < 1e-9). Prints "ok rank R".
"""
import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from mpi4py import MPI

import ringattn
import ringattn.torch as rt

VOCAB, WIDTH, HEADS, KV_HEADS, SEQ, BATCH = 11, 16, 4, 2, 13, 2  # per data-parallel replica: BATCH rows


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dh = WIDTH // HEADS
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.q = nn.Linear(WIDTH, HEADS * self.dh)
        self.kv = nn.Linear(WIDTH, 2 * KV_HEADS * self.dh)
        self.proj = nn.Linear(HEADS * self.dh, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x, attend):
        b, n, _ = x.shape
        y = self.norm1(x)
        q = self.q(y).view(b, n, HEADS, self.dh)
        k, v = self.kv(y).view(b, n, 2, KV_HEADS, self.dh).unbind(2)
        x = x + self.proj(attend(q, k, v).reshape(b, n, HEADS * self.dh))
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(SEQ, WIDTH)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens, positions, attend):
        x = self.tok(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x, attend)
        return self.head(x)


def sdpa_causal(q, k, v):
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


def model_and_optimizer():
    torch.manual_seed(0)  # the same initial parameters on every rank and for the reference
    model = Tiny().double()
    return model, torch.optim.Adam(model.parameters(), lr=3e-3)


def batch(step, rows):
    g = torch.Generator().manual_seed(100 + step)  # the same global batch on every rank
    seq = torch.randint(0, VOCAB, (rows, SEQ + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sp", type=int, default=0, help="ranks per ring (default: all ranks)")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    sp = args.sp or world.size
    assert world.size % sp == 0, f"--sp {sp} must divide the number of ranks {world.size}"
    replicas, replica = world.size // sp, world.rank // sp
    ring = ringattn.Ring(world.Split(color=replica, key=world.rank), layout="zigzag")
    rows = replicas * BATCH
    n_tokens = rows * SEQ

    model, opt = model_and_optimizer()
    ref, ref_opt = model_and_optimizer()
    pos = rt.positions(ring, SEQ)
    attend = lambda q, k, v: rt.ring_attention(q, k, v, ring, causal=True)  # noqa: E731
    for step in range(args.steps):
        tokens, targets = batch(step, rows)
        mine = slice(replica * BATCH, (replica + 1) * BATCH)
        logits = model(rt.shard(tokens[mine], ring), pos, attend)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), rt.shard(targets[mine], ring).reshape(-1),
                               reduction="sum") / n_tokens
        opt.zero_grad()
        loss.backward()
        rt.allreduce_grads(model.parameters(), world)
        opt.step()
        total = world.allreduce(loss.item(), op=MPI.SUM)

        ref_logits = ref(tokens, torch.arange(SEQ), sdpa_causal)
        ref_loss = F.cross_entropy(ref_logits.reshape(-1, VOCAB), targets.reshape(-1))
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        diff = abs(total - ref_loss.item()) / abs(ref_loss.item())
        assert diff < 1e-9, f"rank {world.rank} step {step}: loss {total!r} vs one-process {ref_loss.item()!r}"
        if world.rank == 0 and step in (0, args.steps - 1):
            print(f"step {step}: loss {total:.12f} (one process {ref_loss.item():.12f}, rel diff {diff:.1e})")
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        d = float((p - r).detach().norm() / r.detach().norm())
        assert d < 1e-9, f"rank {world.rank}: parameter {name} differs from one-process training by {d:.2e}"
    print(f"ok rank {world.rank}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
