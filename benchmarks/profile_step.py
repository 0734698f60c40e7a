"""Time (and optionally profile) one training step of the Blockwise Transformer in one process.

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py [--seq 1024] [--batch 16] [--steps 5] [--profile]

model.loss_and_grads on the needle task's config (layers.LocalAttention, float32), after one warm-up
step. Prints the median step time (wall, and the process's CPU time: steadier on a shared machine),
the minor page faults per step (fresh memory touched), the peak RSS of the process (VmHWM) and,
with --profile, the cProfile table of the timed steps sorted by own time. --grads passes preallocated gradient arrays
(views of one flat buffer, as the trainer does) through loss_and_grads(grads=).
"""
import argparse
import cProfile
import pstats
import resource
import time
import types

import numpy as np

from ringattn import tasks
from ringattn.layers import LocalAttention
from ringattn.model import BlockwiseTransformer, ModelConfig, init_params


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def flat_grads(params):
    """name -> view of one flat buffer, shaped like the parameter."""
    n = sum(a.size for a in params.values())
    flat = np.empty(n, dtype=next(iter(params.values())).dtype)
    out, o = {}, 0
    for k, a in params.items():
        out[k] = flat[o:o + a.size].reshape(a.shape)
        o += a.size
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--task", default="needle")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--grads", action="store_true", help="write gradients into given arrays (grads=)")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    cfg = ModelConfig.for_task(a.task, width=a.width, layers=a.layers, heads=a.heads)
    params = init_params(cfg, seed=0)
    task = tasks.get(a.task)(types.SimpleNamespace(seed=0, seq_len=a.seq, in_features=8, train_size=0))
    x, y = task.batch(0, a.seq, a.batch)
    pos = np.arange(a.seq)
    model = BlockwiseTransformer(cfg, LocalAttention())
    kw = {"grads": flat_grads(params)} if a.grads else {}
    model.loss_and_grads(params, x, pos, y, **kw)  # warm-up
    prof = cProfile.Profile() if a.profile else None
    times, cpu = [], []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(a.steps):
        if prof:
            prof.enable()
        t, c = time.perf_counter(), time.process_time()
        loss, _, _ = model.loss_and_grads(params, x, pos, y, **kw)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if prof:
            prof.disable()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / a.steps
    print(f"seq {a.seq} x batch {a.batch}, width {a.width}, layers {a.layers}: step median "
          f"{np.median(times):.4f} s wall (min {min(times):.4f}), {np.median(cpu):.4f} s CPU, "
          f"{faults:.0f} minor page faults/step, loss {loss:.6f}, peak RSS {vm_hwm_mib():.1f} MiB")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(a.top)


if __name__ == "__main__":
    main()
