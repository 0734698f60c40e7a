"""Forward and backward of ringattn's CUDA attention against PyTorch SDPA (flash backend), same run.

    python benchmarks/gpu/bench_attention.py --seq 8192 --heads 16 --dim 128 --dtype bfloat16

Interleaved repeats (ours, torch, ours, torch ...), medians, CUDA-event timing. FLOPs follow the
FlashAttention convention: forward 4 * B * H * S^2 * D (halved when causal), backward 2.5x forward.
Our backward time includes delta = rowsum(dout * out) and zeroing the float32 gradient buffers.
"""
import argparse
import statistics
import sys

import numpy as np

import cupy as cp
from common import empty, gpu_time, to_device
from ringattn import cuda


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    B, S, H, D = a.batch, a.seq, a.heads, a.dim
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((B, S, H, D)).astype(np.float32) for _ in range(4)]
    q, k, v, do = (to_device(x, a.dtype) for x in host)
    out, lse = empty((B, S, H, D), a.dtype), cp.empty((B, H, S), cp.float32)
    dlt = cp.empty((B, H, S), cp.float32)
    grads = [cp.zeros((B, S, H, D), cp.float32) for _ in range(3)]

    def ours_fwd():
        cuda.forward(q, k, v, out, lse, causal=a.causal)

    def ours_bwd():
        for g in grads:
            g.fill(0)
        cuda.delta(do, out, into=dlt)
        cuda.backward(do, q, k, v, lse, dlt, *grads, causal=a.causal)

    runs = {"ours fwd": ours_fwd, "ours bwd": ours_bwd}
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        tdt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[a.dtype]
        tq, tk, tv, tdo = (torch.from_numpy(x).to("cuda", tdt).transpose(1, 2).requires_grad_() for x in host)
        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION if a.dtype != "float32" else SDPBackend.EFFICIENT_ATTENTION)
        with ctx:
            tout = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=a.causal)

        def torch_fwd():
            with ctx, torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=a.causal)

        def torch_bwd():
            torch.autograd.grad(tout, (tq, tk, tv), tdo, retain_graph=True)

        # torch runs on its current stream; make CuPy's events measure the same (default) stream.
        runs.update({"torch fwd": torch_fwd, "torch bwd": torch_bwd})
        baseline = f"torch {torch.__version__} SDPA ({'flash' if a.dtype != 'float32' else 'efficient'} backend)"
    except Exception as e:  # noqa: BLE001 - torch is optional
        baseline = f"no torch baseline ({type(e).__name__}: {e})"

    for fn in runs.values():  # warm-up (and JIT of torch kernels)
        fn()
    cp.cuda.Device().synchronize()
    times = {name: [] for name in runs}
    for _ in range(a.reps):
        for name, fn in runs.items():
            times[name].append(gpu_time(fn))
    fwd_flops = 4 * B * H * S * S * D * (0.5 if a.causal else 1.0)
    print(f"# attention B{B} S{S} H{H} D{D} {a.dtype} {'causal' if a.causal else 'non-causal'}; "
          f"baseline: {baseline}; device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"# command: {' '.join(sys.argv)}")
    print(f"{'run':<10} {'median ms':>10} {'TFLOP/s':>8} {'vs torch':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = fwd_flops * (2.5 if "bwd" in name else 1.0)
        other = name.replace("ours", "torch")
        ratio = ""
        if name.startswith("ours") and other in times:
            ratio = f"{statistics.median(times[other]) / med:.2f}x"
        print(f"{name:<10} {med:>10.3f} {flops / med / 1e9:>8.1f} {ratio:>9}")


if __name__ == "__main__":
    main()
