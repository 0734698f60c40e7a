"""One timing row per kernel against PyTorch in the same run: attention forward and backward (against
torch SDPA, torch's own backend choice) for bfloat16 and float16 at head dims 64 and 128, and the
blockwise FFN forward and backward (ringattn.cuda_ffn, the products in cuBLAS, as the backend runs it;
against torch addmm + tanh-GELU + addmm) for bfloat16 and float16. Attention dispatches by itself:
16-bit at head dim 64 / 128 takes the tensor-core kernels (cuda/attention_mma.cu).

    python benchmarks/gpu/bench_attention.py [--seq 8192] [--heads 16] [--reps 5] [--json bench.json]

Interleaved repeats (ours, torch, ours, torch ...), medians, CUDA-event timing on each library's
current stream. FLOPs: attention forward 4 * B * H * S^2 * D (halved when causal), backward 2.5x
forward (the FlashAttention convention); FFN forward 4 * tokens * width * hidden, backward twice that.
Our attention backward includes delta = rowsum(dout * out) and zeroing the float32 gradients; the FFN
backward includes zeroing its float32 weight gradients. Each row also compares our result with
torch's (a fast wrong kernel must not pass as a benchmark).
"""
import argparse
import json
import statistics
import sys

import numpy as np

import cupy as cp
from common import empty, gpu_time, host, result, to_device
from ringattn import cuda, cuda_ffn, reference

SANITY = {"bfloat16": 3e-2, "float16": 1e-2}  # ours vs torch, relative: both round to the dtype


def torch_timer(torch):
    def time_ms(fn):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    return time_ms


def interleaved(ours, theirs, reps, ttime):
    for fn in (ours, theirs):  # warm-up: CuPy/NVRTC compiles, torch's kernel selection
        fn()
    cp.cuda.Device().synchronize()
    a, b = [], []
    for _ in range(reps):
        a.append(gpu_time(ours))
        b.append(ttime(theirs))
    return statistics.median(a), statistics.median(b)


def attention_rows(torch, a, dtype, d, ttime):
    B, S, H = 1, a.seq, a.heads
    rng = np.random.default_rng(0)
    hq = [rng.standard_normal((B, S, H, d)).astype(np.float32) for _ in range(4)]
    q, k, v, do = (to_device(x, dtype) for x in hq)
    out, lse = empty((B, S, H, d), dtype), cp.empty((B, H, S), cp.float32)
    dlt = cp.empty((B, H, S), cp.float32)
    grads = [cp.zeros((B, S, H, d), cp.float32) for _ in range(3)]
    tdt = getattr(torch, dtype)
    tq, tk, tv, tdo = (torch.from_numpy(x).to("cuda", tdt).transpose(1, 2).contiguous().requires_grad_() for x in hq)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def ours_fwd():
        cuda.forward(q, k, v, out, lse, causal=a.causal)

    def ours_bwd():
        for g in grads:
            g.fill(0)
        cuda.delta(do, out, into=dlt)
        cuda.backward(do, q, k, v, lse, dlt, *grads, causal=a.causal)

    def torch_fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=a.causal)

    tout = sdpa(tq, tk, tv, is_causal=a.causal)

    def torch_bwd():
        torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)

    fwd_ms = interleaved(ours_fwd, torch_fwd, a.reps, ttime)
    bwd_ms = interleaved(ours_bwd, torch_bwd, a.reps, ttime)
    tg = torch.autograd.grad(tout, (tq, tk, tv), tdo)
    as_bshd = lambda t: t.detach().transpose(1, 2).float().cpu().numpy()  # noqa: E731
    fwd_err = reference.rel_error(host(out), as_bshd(tout))
    bwd_err = max(reference.rel_error(host(g), as_bshd(t)) for g, t in zip(grads, tg))
    flops = 4 * B * H * S * S * d * (0.5 if a.causal else 1.0)
    shape = f"B{B} S{S} H{H} D{d}" + (" causal" if a.causal else "")
    return [row("attention forward", dtype, d, shape, fwd_ms, flops, fwd_err),
            row("attention backward", dtype, d, shape, bwd_ms, 2.5 * flops, bwd_err)]


def ffn_rows(torch, a, dtype, ttime):
    T, W, Hd = a.tokens, a.width, 4 * a.width
    rng = np.random.default_rng(1)
    hx, hdy = rng.standard_normal((T, W)), rng.standard_normal((T, W))
    hw1, hw2 = rng.standard_normal((W, Hd)) / np.sqrt(W), rng.standard_normal((Hd, W)) / np.sqrt(Hd)
    hb1, hb2 = rng.standard_normal(Hd) / 10, rng.standard_normal(W) / 10
    x, dy, w1, b1, w2, b2 = (to_device(t, dtype) for t in (hx, hdy, hw1, hb1, hw2, hb2))
    y, dx = empty((T, W), dtype), empty((T, W), dtype)
    grads = [cp.zeros(s, cp.float32) for s in ((W, Hd), (Hd,), (Hd, W), (W,))]
    tdt = getattr(torch, dtype)
    tx, tw1, tb1, tw2, tb2 = (torch.from_numpy(t).to("cuda", tdt).requires_grad_() for t in (hx, hw1, hb1, hw2, hb2))
    tdy = torch.from_numpy(hdy).to("cuda", tdt)

    def torch_ffn():
        return torch.addmm(tb2, torch.nn.functional.gelu(torch.addmm(tb1, tx, tw1), approximate="tanh"), tw2)

    def ours_fwd():
        cuda_ffn.ffn_forward(x, w1, b1, w2, b2, chunk=a.chunk, out=y)

    def ours_bwd():
        for g in grads:
            g.fill(0)
        cuda_ffn.ffn_backward(x, w1, b1, w2, b2, dy, *grads, chunk=a.chunk, dx=dx)

    def torch_fwd():
        with torch.no_grad():
            torch_ffn()

    ty = torch_ffn()

    def torch_bwd():
        torch.autograd.grad(ty, (tx, tw1, tb1, tw2, tb2), tdy, retain_graph=True)

    fwd_ms = interleaved(ours_fwd, torch_fwd, a.reps, ttime)
    bwd_ms = interleaved(ours_bwd, torch_bwd, a.reps, ttime)
    tg = torch.autograd.grad(ty, (tx, tw1, tb1, tw2, tb2), tdy)
    np_ = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    fwd_err = reference.rel_error(host(y), np_(ty))
    bwd_err = max(reference.rel_error(host(g), np_(t)) for g, t in zip([dx] + grads, tg))
    flops = 4 * T * W * Hd
    shape = f"tokens {T} width {W} hidden {Hd} chunk {a.chunk}"
    return [row("ffn forward", dtype, None, shape, fwd_ms, flops, fwd_err),
            row("ffn backward", dtype, None, shape, bwd_ms, 2 * flops, bwd_err)]


def row(kernel, dtype, d, shape, ms, flops, err):
    ours, theirs = ms
    return {"kernel": kernel, "dtype": dtype, "head_dim": d, "shape": shape, "ours_ms": ours, "torch_ms": theirs,
            "ours_tflops": flops / ours / 1e9, "torch_tflops": flops / theirs / 1e9, "torch_ms_over_ours": theirs / ours,
            "rel_diff_vs_torch": err, "agrees": bool(err < SANITY[dtype])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    import torch

    ttime = torch_timer(torch)
    rows = []
    for dtype in ("bfloat16", "float16"):
        for d in (64, 128):
            rows += attention_rows(torch, a, dtype, d, ttime)
        rows += ffn_rows(torch, a, dtype, ttime)
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"# ringattn CUDA kernels vs torch {torch.__version__} on {name}; command: {' '.join(sys.argv)}")
    print(f"{'kernel':<19} {'dtype':<9} {'D':>4} {'ours ms':>9} {'torch ms':>9} {'ours TF/s':>9} {'torch TF/s':>10} "
          f"{'torch/ours':>10} {'diff':>8}")
    for r in rows:
        print(f"{r['kernel']:<19} {r['dtype']:<9} {r['head_dim'] or '-':>4} {r['ours_ms']:>9.3f} {r['torch_ms']:>9.3f} "
              f"{r['ours_tflops']:>9.1f} {r['torch_tflops']:>10.1f} {r['torch_ms_over_ours']:>9.2f}x "
              f"{r['rel_diff_vs_torch']:>8.1e}{'' if r['agrees'] else '  DISAGREES'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    result(bench_rows=len(rows), **{
        f"{r['kernel'].replace(' ', '_')}_{r['dtype']}" + (f"_d{r['head_dim']}" if r["head_dim"] else "")
        + "_torch_over_ours": round(r["torch_ms_over_ours"], 4) for r in rows})
    bad = [r for r in rows if not r["agrees"]]
    for r in bad:
        print(f"FAIL {r['kernel']} {r['dtype']} D{r['head_dim']}: differs from torch by {r['rel_diff_vs_torch']:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
