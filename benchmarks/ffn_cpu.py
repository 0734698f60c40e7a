"""Blockwise feed-forward kernels (cpp/ffn.cpp): speed against plain NumPy, and peak memory vs tokens.

    python benchmarks/ffn_cpu.py [--tokens 8192] [--repeats 7] [--out benchmarks/results/ffn_cpu.txt]

(a) Speed: tokens/s of forward and forward+backward, float32, width 64 and 256, hidden 4x, against
    the same computation in NumPy (full-sequence matmuls, hidden activation materialised), interleaved
    repeats, medians, ratio = kernel tokens/s / NumPy tokens/s; NumPy's x @ w1 alone (its BLAS sgemm,
    same run) anchors the kernel's GFLOP/s (FLOPs: forward 4*T*C*H, forward+backward 3x that).
(b) Memory: peak RSS growth of one forward+backward call (VmHWM reset before it, each case in a
    fresh process) for growing token counts at a fixed chunk: the kernel's extra memory is
    O(chunk x hidden), flat in tokens; NumPy's grows with tokens x hidden.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

C_GELU, A_GELU = np.float32(np.sqrt(2 / np.pi)), np.float32(0.044715)


def make(tokens, width, hidden, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, width), dtype=np.float32).astype(dtype)
    w1 = (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(dtype)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(dtype)
    w2 = (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(dtype)
    b2 = (0.1 * rng.standard_normal(width)).astype(dtype)
    dy = rng.standard_normal((tokens, width), dtype=np.float32).astype(dtype)
    return x, w1, b1, w2, b2, dy


def numpy_forward(x, w1, b1, w2, b2):
    pre = x @ w1 + b1
    t = np.tanh(C_GELU * (pre + A_GELU * pre**3))
    h = 0.5 * pre * (1 + t)
    return h @ w2 + b2, (pre, t, h)


def numpy_fwd_bwd(x, w1, b1, w2, b2, dy, grads):
    y, (pre, t, h) = numpy_forward(x, w1, b1, w2, b2)
    dpre = (dy @ w2.T) * (0.5 * (1 + t) + 0.5 * pre * (1 - t * t) * C_GELU * (1 + 3 * A_GELU * pre * pre))
    grads[0] += x.T @ dpre
    grads[1] += dpre.sum(0)
    grads[2] += h.T @ dy
    grads[3] += dy.sum(0)
    return y, dpre @ w1.T


def kernel_fwd_bwd(x, w1, b1, w2, b2, dy, grads, chunk):
    from ringattn import kernels

    y = kernels.ffn_forward(x, w1, b1, w2, b2, chunk=chunk)
    return y, kernels.ffn_backward(x, w1, b1, w2, b2, dy, *grads, chunk=chunk)


def speed(tokens, repeats, chunk):
    from ringattn import kernels

    rows = []
    for width in (64, 256):
        hidden = 4 * width
        x, w1, b1, w2, b2, dy = make(tokens, width, hidden)
        grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
        cases = {
            ("forward", "kernel"): lambda: kernels.ffn_forward(x, w1, b1, w2, b2, chunk=chunk),
            ("forward", "numpy"): lambda: numpy_forward(x, w1, b1, w2, b2),
            ("fwd+bwd", "kernel"): lambda: kernel_fwd_bwd(x, w1, b1, w2, b2, dy, grads, chunk),
            ("fwd+bwd", "numpy"): lambda: numpy_fwd_bwd(x, w1, b1, w2, b2, dy, grads),
            ("sgemm", "numpy"): lambda: x @ w1,  # the machine's matmul rate right now, as an anchor
        }
        times = {key: [] for key in cases}
        for fn in cases.values():
            fn()  # warm-up
        for _ in range(repeats):  # interleaved
            for key, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        for what in ("forward", "fwd+bwd"):
            tk, tn = np.median(times[(what, "kernel")]), np.median(times[(what, "numpy")])
            flops = 4 * tokens * width * hidden * (1 if what == "forward" else 3)  # bwd recomputes
            rows.append(
                dict(width=width, hidden=hidden, what=what, kernel_ms=1e3 * tk, numpy_ms=1e3 * tn,
                     kernel_tok_s=tokens / tk, numpy_tok_s=tokens / tn, ratio=tn / tk,
                     kernel_gflops=flops / tk / 1e9,
                     sgemm_gflops=2 * tokens * width * hidden / np.median(times[("sgemm", "numpy")]) / 1e9)
            )
    return rows


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field + " not in /proc/self/status")


def rss_child(impl, tokens, width, chunk):
    """Runs in a fresh process: prints the peak RSS growth (KiB) of one forward+backward call.

    The peak (VmHWM) is reset just before the call (writing 5 to /proc/self/clear_refs, Linux), so
    the allocation of the inputs does not hide the call's own peak; growth = VmHWM after - VmRSS before."""
    hidden = 4 * width
    x, w1, b1, w2, b2, dy = make(tokens, width, hidden)
    grads = [np.zeros_like(a) for a in (w1, b1, w2, b2)]
    y, dx = np.zeros_like(x), np.zeros_like(x)
    from ringattn import _cpu

    small = make(8, width, hidden)  # start OpenMP threads and touch every code path before measuring
    _cpu.ffn_forward(*small[:5], np.empty_like(small[0]), 4)
    _cpu.ffn_backward(*small, np.empty_like(small[0]), *[np.zeros_like(a) for a in small[1:5]], 4)
    numpy_fwd_bwd(*small, [np.zeros_like(a) for a in small[1:5]])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    if impl == "kernel":
        _cpu.ffn_forward(x, w1, b1, w2, b2, y, chunk)
        _cpu.ffn_backward(x, w1, b1, w2, b2, dy, dx, *grads, chunk)
    else:
        numpy_fwd_bwd(x, w1, b1, w2, b2, dy, grads)
    print(json.dumps(dict(growth_kib=_status_kib("VmHWM") - before)))


def memory(chunk, width):
    # A fixed mmap threshold makes glibc map large blocks fresh and unmap them on free, so scratch
    # shows up in RSS instead of silently reusing pages freed earlier in the process.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    rows = []
    for tokens in (8192, 32768, 131072):
        row = dict(tokens=tokens, width=width, hidden=4 * width, chunk=chunk)
        # NumPy materialises several tokens x hidden arrays: keep it to sizes that fit comfortably.
        for impl in ("kernel", "numpy") if tokens <= 32768 else ("kernel",):
            out = subprocess.run(
                [sys.executable, *([] if sys.flags.no_site == 0 else ["-S"]), __file__, "--rss-child", impl,
                 str(tokens), str(width), str(chunk)],
                check=True, capture_output=True, text=True, timeout=300, env=env,
            ).stdout
            row[impl + "_mib"] = json.loads(out.strip().splitlines()[-1])["growth_kib"] / 1024
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    ap.add_argument("--append", action="store_true", help="append to --out instead of overwriting it")
    ap.add_argument("--no-memory", action="store_true", help="skip part (b)")
    ap.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        impl, tokens, width, chunk = args.rss_child
        return rss_child(impl, int(tokens), int(width), int(chunk))

    from ringattn import _cpu

    lines = [
        "command: " + " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                               if k in os.environ) + " python " + " ".join(sys.argv),
        "load average at start (shared machine: absolute times are noisy, ratios are interleaved): "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        f"isa {_cpu.active_isa()}, OMP threads {_cpu.max_threads()}, numpy {np.__version__}, float32, "
        f"chunk {args.chunk}, tokens {args.tokens}, medians of {args.repeats} interleaved repeats",
        "",
        "(a) speed: kernel vs NumPy (full-sequence matmuls, same math); ratio = NumPy time / kernel time",
        f"{'width':>5} {'hidden':>6} {'pass':>8} {'kernel ms':>10} {'numpy ms':>9} {'kernel tok/s':>13} "
        f"{'numpy tok/s':>12} {'ratio':>6} {'kernel GFLOP/s':>15} {'numpy x@w1 GFLOP/s':>19}",
    ]
    for r in speed(args.tokens, args.repeats, args.chunk):
        lines.append(
            f"{r['width']:>5} {r['hidden']:>6} {r['what']:>8} {r['kernel_ms']:>10.2f} {r['numpy_ms']:>9.2f} "
            f"{r['kernel_tok_s']:>13.0f} {r['numpy_tok_s']:>12.0f} {r['ratio']:>6.2f} {r['kernel_gflops']:>15.1f} "
            f"{r['sgemm_gflops']:>19.1f}"
        )
    if not args.no_memory:
        lines += [
            "",
            f"(b) peak RSS growth of one forward+backward call (fresh process each), width 256, hidden 1024, "
            f"chunk {args.chunk}",
            f"{'tokens':>7} {'kernel MiB':>11} {'numpy MiB':>10}",
        ]
        for r in memory(args.chunk, 256):
            numpy_mib = f"{r['numpy_mib']:>10.1f}" if "numpy_mib" in r else f"{'-':>10}"
            lines.append(f"{r['tokens']:>7} {r['kernel_mib']:>11.1f} {numpy_mib}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "a" if args.append else "w") as f:
            f.write(report + "\n\n")


if __name__ == "__main__":
    main()
