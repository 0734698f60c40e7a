"""`ringattn bench train`: tokens/s of a training step, the FFN's activation memory per rank.

    python -m ringattn bench train                                   # one process
    mpiexec -n 4 python -m mpi4py -m ringattn bench train --sp 4     # the ring over 4 ranks

1. Training step (forward + backward + gradient Allreduce + AdamW) of the needle model at the
   given shapes, in ringattn (all ranks, the ring over --sp of them), interleaved with the same
   model and shapes in PyTorch on the CPU (one process on rank 0 with every core, the other ranks
   asleep), when torch is importable. Medians over --repeats rounds; the ratio is
   ringattn tokens/s / PyTorch tokens/s.
2. FFN activation memory: peak RSS growth (VmHWM, reset just before) of one blockwise FFN
   forward + backward in a fresh process, for shard lengths x chunk sizes, next to the hidden activation a non-blockwise FFN
   keeps (tokens x 4 width x 4 bytes). Blockwise, it is flat in the shard length.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def add_arguments(p):
    p.add_argument("--seq-len", type=int, default=2048, help="sequence length of the timed step")
    p.add_argument("--batch", type=int, default=16, help="global batch of the timed step")
    p.add_argument("--width", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="Transformer blocks")
    p.add_argument("--heads", type=int, default=2, help="attention heads")
    p.add_argument("--sp", type=int, default=0, help="sequence-parallel ranks (0: all)")
    p.add_argument("--layout", default="zigzag", help="ring layout")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians reported)")
    p.add_argument("--torch-threads", type=int, default=0, help="PyTorch threads (0: all cores)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--memory-shards", default="1024,4096,16384,65536", help="FFN memory table: shard lengths")
    p.add_argument("--memory-chunks", default="64,256,1024", help="FFN memory table: chunk sizes")
    p.add_argument("--out", default=None,
                   help="results prefix for .txt and .json (None: runs/bench-<time>/train_cpu in a new folder)")


# ---- the same model in PyTorch (parameter names of ringattn.model) ----------------------------

def torch_loss(tp, cfg, x, labels):
    """Loss of the ringattn model (lm head, causal, token input) written with torch ops.

    tp: name -> torch tensor (ringattn.model names); x (b, s) long; labels (b, s), -1 = ignore.
    Returns (loss, correct).
    """
    import torch
    import torch.nn.functional as F
    b, s = x.shape
    h, d, w = cfg.heads, cfg.head_dim, cfg.width
    hk = cfg.n_kv_heads
    pos = torch.arange(s, dtype=torch.float64)
    inv = cfg.rope_base ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2.0 / d)
    ang = pos[:, None] * inv[None, :]
    dt = tp["ln_f.g"].dtype
    cos, sin = torch.cos(ang).to(dt)[:, None, :], torch.sin(ang).to(dt)[:, None, :]

    def rope(t):
        t1, t2 = t[..., : d // 2], t[..., d // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    def ln(t, pre):
        return F.layer_norm(t, (w,), tp[pre + "g"], tp[pre + "b"], eps=1e-5)

    z = tp["embed.w"][x]
    for i in range(cfg.layers):
        p = f"blocks.{i}."
        a = ln(z, p + "ln1.")
        qkv = a @ tp[p + "attn.wqkv"] + tp[p + "attn.bqkv"]
        q = rope(qkv[..., : h * d].reshape(b, s, h, d))
        k = rope(qkv[..., h * d:(h + hk) * d].reshape(b, s, hk, d))
        v = qkv[..., (h + hk) * d:].reshape(b, s, hk, d)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=cfg.causal, enable_gqa=hk != h)
        z = z + o.transpose(1, 2).reshape(b, s, h * d) @ tp[p + "attn.wo"] + tp[p + "attn.bo"]
        f = ln(z, p + "ln2.")
        f = F.gelu(f @ tp[p + "ffn.w1"] + tp[p + "ffn.b1"], approximate="tanh")
        z = z + f @ tp[p + "ffn.w2"] + tp[p + "ffn.b2"]
    z = ln(z, "ln_f.")
    sel = labels.reshape(-1) >= 0
    logits = z.reshape(-1, w)[sel] @ tp["head.w"] + tp["head.b"]
    lab = labels.reshape(-1)[sel]
    return F.cross_entropy(logits, lab), int((logits.argmax(-1) == lab).sum())


# ---- timing -------------------------------------------------------------------------------------

def _sleep_barrier(comm):
    """A barrier that sleeps instead of spinning, so idle ranks leave the cores to the timed code."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def _ringattn_step(args, world):
    """A closure running one full training step of ringattn on every rank, and the tokens per step."""
    from .. import backends, flat, gradients, optim, parallel, transport
    from ..data import get_batch, task_info
    from ..layers import LocalAttention
    from ..model import BlockwiseTransformer, ModelConfig, init_params, is_decayed
    from ..ring import Ring
    info = task_info("needle")
    cfg = ModelConfig(width=args.width, layers=args.layers, heads=args.heads,
                      **{k: info[k] for k in ("head", "causal", "input", "vocab", "n_classes")})
    sp = args.sp or world.Get_size()
    groups = parallel.Groups(world, sp)
    poll_s = gradients.poll_interval(world)  # as the trainer: how ranks wait where they outnumber the cores
    progress = transport.oversubscribed_progress(poll_s is not None)
    attn = Ring(groups.seq, layout=args.layout, progress=progress) if sp > 1 else LocalAttention()
    model = BlockwiseTransformer(cfg, attn, groups.seq if sp > 1 else None)
    init = init_params(cfg, 0)
    layout = flat.plan_like(init, is_decayed)  # as the trainer: flat parameters, gradients, moments
    params = flat.FlatArrays(layout, backends.cpu).assign(init)
    grads = flat.FlatArrays(layout, backends.cpu)
    hp = optim.AdamWConfig()
    opt = optim.FlatAdamW(params)
    x, y = get_batch("needle", args.batch, args.seq_len, step=0)
    rows = parallel.batch_slice(args.batch, groups.dp, groups.replica)
    pos = np.arange(args.seq_len) if sp == 1 else attn.positions(args.seq_len)
    xl, yl = np.ascontiguousarray(x[rows][:, pos]), np.ascontiguousarray(y[rows][:, pos])

    # as the trainer: the flat gradient buffer is the message, waited for with sleeps where ranks outnumber cores
    reduce = parallel.GradientReducer(world, poll_s=poll_s)

    def step():
        loss, _, _ = model.loss_and_grads(params.arrays, xl, pos, yl, grads=grads.arrays)
        reduce.flat(grads, groups.dp)
        scale = optim.clip_scale(optim.flat_global_norm(grads), hp.clip)
        opt.update(params, grads, 1e-4, hp, grad_scale=scale)
        return loss

    return step, cfg, (x, y)


def _torch_step(cfg, batch, threads):
    import torch
    from .. import model as M
    torch.set_num_threads(threads)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in M.init_params(cfg, 0).items()}
    opt = torch.optim.AdamW(list(tp.values()), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.tensor(batch[0], dtype=torch.long)
    y = torch.tensor(batch[1], dtype=torch.long)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = torch_loss(tp, cfg, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0)
        opt.step()
        return loss.item()

    return step


def time_steps(comm, fn, steps):
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    comm.Barrier()
    return (time.perf_counter() - t) / steps


# ---- FFN activation memory ----------------------------------------------------------------------

def _peak_rss_kib():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])


def ffn_memory_child(s, c, w):
    """In a fresh process (ffn_memory runs `python -m ringattn.bench.train ffn-memory S C W`): print the
    peak RSS growth (KiB) of one FFN forward + backward over s rows of width w, chunk c."""
    from ringattn import kernels
    x = np.full((s, w), 0.3, np.float32)  # np.full: no temporaries
    dy = np.full((s, w), 0.2, np.float32)
    w1 = np.full((w, 4 * w), 0.01, np.float32)
    b1 = np.zeros(4 * w, np.float32)
    w2 = np.full((4 * w, w), -0.01, np.float32)
    b2 = np.zeros(w, np.float32)
    g = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    y, dx = np.empty_like(x), np.empty_like(x)
    for a in (y, dx):
        a.fill(0)
    kernels.ffn_forward(x[:8].copy(), w1, b1, w2, b2, chunk=8)   # load code and thread pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _peak_rss_kib()
    kernels.ffn_forward(x, w1, b1, w2, b2, chunk=c, out=y)
    dx = kernels.ffn_backward(x, w1, b1, w2, b2, dy, *g, chunk=c)  # noqa: F841 (a fresh array: ffn_memory subtracts it)
    print(_peak_rss_kib() - base)


def ffn_memory(shards, chunks, width):
    """Rows (shard, chunk, measured KiB growth, naive hidden KiB)."""
    rows = []
    for s in shards:
        for c in chunks:
            child = ["-m", "ringattn.bench.train", "ffn-memory", str(s), str(c), str(width)]
            out = subprocess.run([sys.executable, *child],
                                 capture_output=True, text=True, check=True,
                                 env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
            # backward output dx (s x width) is a fresh array: subtract it, it is not FFN scratch
            grown = int(out.stdout.strip()) - s * width * 4 // 1024
            rows.append((s, c, max(grown, 0), s * 4 * width * 4 // 1024))
    return rows


def run(args):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    step, cfg, batch = _ringattn_step(args, world)
    torch_step = None
    if not args.no_torch:
        try:
            import torch  # noqa: F401
            has_torch = True
        except ImportError:
            has_torch = False
        if has_torch and rank == 0:
            torch_step = _torch_step(cfg, batch, args.torch_threads or os.cpu_count())
        has_torch = world.bcast(has_torch, root=0)
    else:
        has_torch = False
    tokens = args.seq_len * args.batch
    step()  # warm-up
    if torch_step:
        torch_step()
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(time_steps(world, step, args.steps))
        if has_torch:
            _sleep_barrier(world)
            if rank == 0:
                t = time.perf_counter()
                for _ in range(args.steps):
                    torch_step()
                theirs.append((time.perf_counter() - t) / args.steps)
            _sleep_barrier(world)
    if rank != 0:
        return 0
    med = statistics.median(ours)
    res = {"command": " ".join(["ringattn bench train"] + sys.argv[3:]), "ranks": size, "sp": args.sp or size,
           "seq_len": args.seq_len, "batch": args.batch, "width": args.width, "layers": args.layers,
           "heads": args.heads, "omp_threads": os.environ.get("OMP_NUM_THREADS"),
           "ringattn_step_s": med, "ringattn_tokens_per_s": tokens / med, "ringattn_step_s_all": ours}
    lines = [f"# {res['command']}  (ranks {size}, OMP_NUM_THREADS={res['omp_threads']})",
             f"training step, needle model width {args.width}, {args.layers} layers, {args.heads} heads, "
             f"seq {args.seq_len} x batch {args.batch}, medians of {args.repeats} rounds x {args.steps} steps",
             f"  ringattn ({size} ranks, sp {res['sp']}): {med * 1e3:9.1f} ms/step  {tokens / med:10.0f} tokens/s"]
    if theirs:
        tm = statistics.median(theirs)
        res.update(torch_step_s=tm, torch_tokens_per_s=tokens / tm, torch_step_s_all=theirs,
                   torch_threads=args.torch_threads or os.cpu_count(), ratio_vs_torch=tm / med)
        lines.append(f"  PyTorch CPU (1 process, {res['torch_threads']} threads): {tm * 1e3:9.1f} ms/step  "
                     f"{tokens / tm:10.0f} tokens/s")
        lines.append(f"  ratio ringattn / PyTorch tokens/s: {tm / med:.2f}x")
    else:
        lines.append("  PyTorch not installed: no baseline (pip install torch)")
    shards = [int(v) for v in args.memory_shards.split(",") if v]
    chunks = [int(v) for v in args.memory_chunks.split(",") if v]
    mem = ffn_memory(shards, chunks, args.width)
    res["ffn_memory_kib"] = [dict(shard=s, chunk=c, measured=m, naive_hidden=n) for s, c, m, n in mem]
    lines.append(f"FFN activation memory per rank (width {args.width}, hidden {4 * args.width}, float32): "
                 "peak RSS growth of forward+backward, KiB")
    lines.append("  shard tokens " + "".join(f"  chunk {c:>5}" for c in chunks) + "   non-blockwise hidden")
    for s in shards:
        row = [m for (s2, c, m, n) in mem if s2 == s]
        naive = [n for (s2, c, m, n) in mem if s2 == s][0]
        lines.append(f"  {s:12d} " + "".join(f"  {m:11d}" for m in row) + f"   {naive:20d}")
    text = "\n".join(lines)
    print(text)
    from . import out_prefix
    prefix = out_prefix(args.out, "train_cpu")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".txt", "w") as f:
        f.write(text + "\n")
    with open(prefix + ".json", "w") as f:
        json.dump(res, f, indent=1)
    print(f"saved {prefix}.txt and {prefix}.json")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["ffn-memory"]:
    ffn_memory_child(*(int(a) for a in sys.argv[2:5]))
