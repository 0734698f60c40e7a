"""The step kernels of issue 16 (C++, backends.cpu) against the NumPy code they replace
(backends/xp_fused.py run on NumPy: the arithmetic layers.py / optim.py had; Linear: OpenBLAS
through numpy.matmul against cpp/linear.cpp on gemm.hpp), same process, same
shapes as a training step of the default model (width 64, 2 heads of 64/2, qkv 192) at
seq x batch tokens. Prints one line per kernel: NumPy ms, C++ ms, ratio.

    OMP_NUM_THREADS=1 python benchmarks/fused_kernels.py [--tokens 16384] [--repeat 20] [--only NAME ...]

embedding_backward: the NumPy side is what layers.Embedding did (dw = 0, np.add.at), vocab 224.
"""
import argparse
import time

import numpy as np

from ringattn import reference
from ringattn.backends import cpu, xp_fused


def best_ms(fn, repeat):
    fn()  # warm-up (first touch of the outputs, thread team start)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def cases(tokens, width=64, heads=2, classes=32, params=400_000, vocab=224, dt=np.float32):
    rng = np.random.default_rng(0)
    d = width // heads
    seq = 1024
    b = tokens // seq
    x = rng.standard_normal((tokens, width)).astype(dt)
    zero = np.zeros((tokens, width), dt)  # x += 0: repeatable
    g, bb = rng.standard_normal(width).astype(dt), rng.standard_normal(width).astype(dt)
    dy = rng.standard_normal((tokens, width)).astype(dt)
    y, mean, rstd = cpu.layernorm_forward(x, g, bb, 1e-5)
    dg, db, dx = np.empty_like(g), np.empty_like(g), np.empty_like(x)
    qkv = rng.standard_normal((b, seq, 3 * heads * d)).astype(dt)
    cos, sin = (t.astype(dt) for t in reference.rope_angles(np.arange(seq), d))
    n_lab = tokens // 8
    logits = rng.standard_normal((n_lab, classes)).astype(dt)
    labels = rng.integers(0, classes, n_lab)
    out = np.empty_like(logits)
    p, gr, m, v = (rng.standard_normal(params).astype(dt) for _ in range(4))
    v = np.abs(v)
    hp = (1e-3, 0.9, 0.95, 1e-8, 0.1, 7, 0.5)
    wq, bq = (rng.standard_normal((width, 3 * width)) / 8).astype(dt), rng.standard_normal(3 * width).astype(dt)
    yq, dyq = np.empty((tokens, 3 * width), dt), rng.standard_normal((tokens, 3 * width)).astype(dt)
    dwq, dbq = np.empty_like(wq), np.empty_like(bq)
    ids, dwe = rng.integers(0, vocab, tokens), np.empty((vocab, width), dt)
    return {
        "embedding_backward": (lambda: xp_fused.embedding_backward(np, ids, dy, dwe, np.add.at),
                               lambda: cpu.embedding_backward(ids, dy, dwe)),
        "linear_forward (qkv)": (lambda: xp_fused.linear_forward(np, x, wq, bq, out=yq),
                                 lambda: cpu.linear_forward(x, wq, bq, out=yq)),
        "linear_backward (qkv)": (lambda: xp_fused.linear_backward(np, dyq, x, wq, dwq, dbq, dx=dx),
                                  lambda: cpu.linear_backward(dyq, x, wq, dwq, dbq, dx=dx)),
        "layernorm_forward": (lambda: xp_fused.layernorm_forward(np, x, g, bb, 1e-5, out=y),
                              lambda: cpu.layernorm_forward(x, g, bb, 1e-5, out=y)),
        "add_layernorm_forward": (lambda: xp_fused.add_layernorm_forward(np, x, zero, g, bb, 1e-5, out=y),
                                  lambda: cpu.add_layernorm_forward(x, zero, g, bb, 1e-5, out=y)),
        "layernorm_backward": (lambda: xp_fused.layernorm_backward(np, dy, x, g, mean, rstd, dg, db, dx=dx),
                               lambda: cpu.layernorm_backward(dy, x, g, mean, rstd, dg, db, dx=dx)),
        "layernorm_backward+residual": (lambda: xp_fused.layernorm_backward(np, dy, x, g, mean, rstd, dg, db, residual=dx),
                                        lambda: cpu.layernorm_backward(dy, x, g, mean, rstd, dg, db, residual=dx)),
        "rope (q and k, in place)": (lambda: xp_fused.rope(np, qkv, cos, sin, heads, heads, d),
                                     lambda: cpu.rope(qkv, cos, sin, heads, heads, d)),
        "softmax_xent": (lambda: xp_fused.softmax_xent(np, logits, labels, 0.1, out=out),
                         lambda: cpu.softmax_xent(logits, labels, 0.1, out=out)),
        "sum_squares": (lambda: xp_fused.sum_squares(np, gr), lambda: cpu.sum_squares(gr)),
        "adamw_update": (lambda: xp_fused.adamw_update(np, p, gr, m, v, *hp), lambda: cpu.adamw_update(p, gr, m, v, *hp)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="run only the kernels whose name starts with one of these")
    args = ap.parse_args()
    from ringattn import _cpu
    print(f"# tokens {args.tokens}, float32, {_cpu.max_threads()} thread(s), ISA {_cpu.active_isa()}; best of {args.repeat}")
    print(f"{'kernel':32s} {'numpy ms':>9s} {'c++ ms':>9s} {'ratio':>7s}")
    for name, (old, new) in cases(args.tokens).items():
        if args.only is not None and not any(name.startswith(o) for o in args.only):
            continue
        t_old, t_new = best_ms(old, args.repeat), best_ms(new, args.repeat)
        print(f"{name:32s} {t_old:9.3f} {t_new:9.3f} {t_old / t_new:6.1f}x")


if __name__ == "__main__":
    main()
