"""`ringattn bench kernel`: the blockwise attention kernels against NumPy and PyTorch SDPA.

float32, forward and forward+backward, on shapes (batch, heads, heads_kv, seq, dim). All
implementations run in the same process with the same thread count, repeats interleaved
(ringattn, numpy, torch, ringattn, ...), medians reported; ratio = baseline time / ringattn time.
FLOPs follow the FlashAttention convention: forward 4*B*H*Sq*Sk*D (halved when causal), backward
2.5x forward. Also measures the forward's extra memory (peak RSS beyond inputs and outputs) for a
long sequence in a fresh subprocess, and ratios measured in the same run: the machine's sgemm
rate (NumPy's BLAS, same threads) next to the non-causal forward, and causal/full forward time
from alternating calls (one ratio per pair, median), so a noisy machine moves both alike.

Importable: `rows = ringattn.bench.kernel.bench(shapes, threads=2, repeats=5)`.
"""
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

SHAPES = [  # (batch, heads, heads_kv, seq, dim, causal)
    (1, 8, 8, 4096, 64, False),
    (1, 8, 8, 4096, 64, True),
    (1, 8, 8, 1024, 128, False),
    (2, 4, 2, 2048, 64, False),
]
QUICK_SHAPES = [(1, 2, 2, 256, 64, False), (1, 2, 2, 256, 64, True), (1, 4, 2, 200, 32, False)]
MEMORY_SHAPE = (1, 1, 1, 65536, 64)  # seq 65536, 1 head, dim 64: naive scores would be 16 GiB


def add_arguments(p):
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count(),
                   help="threads for every implementation (OMP_NUM_THREADS, torch.set_num_threads, BLAS)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation (median reported)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    p.add_argument("--gap", type=float, default=0.2,
                   help="seconds of sleep before each timed call, so the previous library's worker threads "
                        "(OpenMP, OpenBLAS) stop spinning and do not steal the cores from the next one")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline even if installed")
    p.add_argument("--no-memory", action="store_true", help="skip the long-sequence memory check")
    p.add_argument("--json", metavar="PATH", help="write the rows and the machine description here")


def flops(b, h, s, d, causal):
    f = 4.0 * b * h * s * s * d
    return f / 2 if causal else f


# ---- implementations: each returns (forward(), forward_backward()) closures --------------------
def ringattn_impl(q, k, v, dout, causal):
    import ringattn

    def fwd():
        return ringattn.attention_forward(q, k, v, causal=causal)

    def fwd_bwd():
        out, lse = fwd()
        return ringattn.attention_backward(dout, q, k, v, out, lse, causal=causal)

    return fwd, fwd_bwd


def numpy_impl(q, k, v, dout, causal):
    """Plain float32 NumPy, one (batch, head) at a time: scores, softmax, and their gradients."""
    b, s, h, d = q.shape
    g = h // k.shape[2]
    scale = np.float32(1.0 / np.sqrt(d))
    mask = np.triu(np.ones((s, s), bool), 1) if causal else None

    def probs(bi, hi):
        sc = (q[bi, :, hi] @ k[bi, :, hi // g].T) * scale
        if mask is not None:
            sc[mask] = -np.inf
        sc -= sc.max(axis=1, keepdims=True)
        np.exp(sc, out=sc)
        sc /= sc.sum(axis=1, keepdims=True)
        return sc

    def fwd():
        out = np.empty_like(q)
        for bi in range(b):
            for hi in range(h):
                out[bi, :, hi] = probs(bi, hi) @ v[bi, :, hi // g]
        return out

    def fwd_bwd():
        out = fwd()
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
        for bi in range(b):
            for hi in range(h):
                hk = hi // g
                p = probs(bi, hi)
                go = dout[bi, :, hi]
                dv[bi, :, hk] += p.T @ go
                dp = go @ v[bi, :, hk].T
                ds = p * (dp - np.sum(go * out[bi, :, hi], axis=1, keepdims=True)) * scale
                dq[bi, :, hi] = ds @ k[bi, :, hk]
                dk[bi, :, hk] += ds.T @ q[bi, :, hi]
        return dq, dk, dv

    return fwd, fwd_bwd


def torch_impl(q, k, v, dout, causal, threads):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    h, hk = q.shape[2], k.shape[2]
    # torch's native layout is (batch, heads, seq, dim); kv heads expanded for GQA (SDPA's math
    # path would do the same), contiguous so torch gets its best case.
    tq = torch.from_numpy(np.ascontiguousarray(q.transpose(0, 2, 1, 3)))
    tk = torch.from_numpy(np.ascontiguousarray(np.repeat(k, h // hk, axis=2).transpose(0, 2, 1, 3)))
    tv = torch.from_numpy(np.ascontiguousarray(np.repeat(v, h // hk, axis=2).transpose(0, 2, 1, 3)))
    tdo = torch.from_numpy(np.ascontiguousarray(dout.transpose(0, 2, 1, 3)))

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)

    def fwd_bwd():
        a, b_, c = (t.detach().requires_grad_() for t in (tq, tk, tv))
        F.scaled_dot_product_attention(a, b_, c, is_causal=causal).backward(tdo)
        return a.grad, b_.grad, c.grad

    return fwd, fwd_bwd


def have_torch():
    try:
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def _time(fn, gap=0.0):
    if gap:
        time.sleep(gap)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(shapes=SHAPES, threads=None, repeats=5, use_torch=True, progress=print, gap=0.2):
    """Rows of measurements (dicts), one per (shape, pass, implementation)."""
    from .. import _cpu

    threads = threads or _cpu.max_threads()
    use_torch = use_torch and have_torch()
    rng = np.random.default_rng(0)
    rows = []
    for (b, h, hk, s, d, causal) in shapes:
        q = rng.standard_normal((b, s, h, d)).astype(np.float32)
        k = rng.standard_normal((b, s, hk, d)).astype(np.float32)
        v = rng.standard_normal((b, s, hk, d)).astype(np.float32)
        dout = rng.standard_normal((b, s, h, d)).astype(np.float32)
        impls = {"ringattn": ringattn_impl(q, k, v, dout, causal), "numpy": numpy_impl(q, k, v, dout, causal)}
        if use_torch:
            impls["torch"] = torch_impl(q, k, v, dout, causal, threads)
        f = flops(b, h, s, d, causal)
        for pi, (pass_, mult) in enumerate((("fwd", 1.0), ("fwd+bwd", 3.5))):
            times = {name: [] for name in impls}
            for fns in impls.values():  # warm-up
                fns[pi]()
            for _ in range(repeats):
                for name, fns in impls.items():  # interleaved
                    times[name].append(_time(fns[pi], gap))
            med = {name: float(np.median(t)) for name, t in times.items()}
            for name, t in med.items():
                rows.append({"batch": b, "heads": h, "heads_kv": hk, "seq": s, "dim": d, "causal": causal,
                             "pass": pass_, "impl": name, "time_s": t, "gflops": f * mult / t / 1e9,
                             "speedup_vs": med[name] / med["ringattn"] if name != "ringattn" else 1.0,
                             "threads": threads, "repeats": repeats, "all_times_s": times[name]})
            if progress:
                progress(f"  measured B{b} H{h}/{hk} S{s} D{d} {'causal' if causal else 'full'} {pass_}")
    return rows


def _proc_status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])


def memory_child(causal):
    """In a fresh process (memory_check runs `python -m ringattn.bench.kernel memory 0|1`): print the
    peak RSS growth (MiB) of one forward at MEMORY_SHAPE and the MiB of its inputs and outputs."""
    from ringattn import kernels as K
    b, h, hk, s, d = MEMORY_SHAPE
    rng = np.random.default_rng(0)
    # float32 straight from the generator: no float64 temporaries that would raise the peak first
    q = rng.standard_normal((b, s, h, d), dtype=np.float32)
    k = rng.standard_normal((b, s, hk, d), dtype=np.float32)
    v = rng.standard_normal((b, s, hk, d), dtype=np.float32)
    out = np.zeros_like(q)
    lse = np.zeros((b, h, s), np.float32)   # touched: resident before the call
    K.forward(q[:, :64], k[:, :64], v[:, :64], out[:, :64], lse[..., :64], causal=causal)  # start the threads
    try:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
    except OSError:
        pass
    before = _proc_status_kib("VmRSS:")
    K.forward(q, k, v, out, lse, causal=causal)
    after = _proc_status_kib("VmHWM:")
    assert np.isfinite(out).all()
    print((after - before) / 1024.0, (q.nbytes * 3 + out.nbytes + lse.nbytes) / 2**20)


def memory_check(threads, causal=False):
    """Peak RSS growth (MiB) of one forward at MEMORY_SHAPE, in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    child = ["-m", "ringattn.bench.kernel", "memory", "1" if causal else "0"]
    r = subprocess.run([sys.executable, *child], env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode:
        raise RuntimeError(f"memory check failed: {r.stderr[-2000:]}")
    growth, io = (float(x) for x in r.stdout.split())
    return {"seq": MEMORY_SHAPE[3], "heads": MEMORY_SHAPE[1], "dim": MEMORY_SHAPE[4], "causal": causal,
            "threads": threads, "peak_rss_growth_mib": growth, "inputs_outputs_mib": io}


def sgemm_gflops(repeats, n=2048, gap=0.2):
    """The machine's sgemm rate: median GFLOP/s of an (n x n) @ (n x n) float32 matmul (NumPy's BLAS)."""
    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    a @ b  # warm-up
    return 2.0 * n ** 3 / float(np.median([_time(lambda: a @ b, gap) for _ in range(repeats)])) / 1e9


def causal_ratio(shape, repeats, gap=0.2):
    """Median over alternating (full, causal) forward pairs of causal time / full time."""
    import ringattn

    b, h, hk, s, d = shape
    rng = np.random.default_rng(2)
    q = rng.standard_normal((b, s, h, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, s, hk, d), dtype=np.float32) for _ in range(2))
    ratios = []
    for i in range(repeats + 1):
        full = _time(lambda: ringattn.attention_forward(q, k, v, causal=False), gap)
        causal = _time(lambda: ringattn.attention_forward(q, k, v, causal=True), gap)
        if i:  # the first pair warms up
            ratios.append(causal / full)
    return float(np.median(ratios)), ratios


def same_run_ratios(rows, repeats, gap):
    """Ratios measured in this run, against this run's own baselines: the non-causal forward's share
    of the machine's sgemm rate, causal/full forward time, the slowest ratio vs torch.
    Returns (lines to print, dict for the JSON)."""
    sgemm = sgemm_gflops(repeats, gap=gap)
    full = [r for r in rows if r["impl"] == "ringattn" and r["pass"] == "fwd" and not r["causal"]]
    best_full = max(r["gflops"] for r in full)
    ratio, ratios = causal_ratio(SHAPES[0][:5], repeats, gap)
    vs_torch = [r["speedup_vs"] for r in rows if r["impl"] == "torch"]
    out = {"sgemm_gflops": sgemm, "full_fwd_gflops_best": best_full, "full_fwd_vs_sgemm": best_full / sgemm,
           "causal_over_full_fwd": ratio, "causal_over_full_all": ratios}
    lines = [f"same-run ratios: sgemm (NumPy BLAS, 2048^3, {rows[0]['threads']} threads) "
             f"{sgemm:.1f} GFLOP/s; best non-causal forward {best_full:.1f} GFLOP/s = {100 * best_full / sgemm:.0f}% "
             f"of sgemm",
             f"  causal/full forward time at {SHAPES[0][:5]}: {ratio:.3f} (median of {len(ratios)} alternating "
             f"pairs, range {min(ratios):.3f}-{max(ratios):.3f}; half the work would give 0.5)"]
    if vs_torch:
        out["min_vs_torch"] = min(vs_torch)
        lines.append(f"  slowest ratio vs torch over all rows: {min(vs_torch):.2f}x")
    return lines, out


def format_table(rows):
    lines = []
    head = (f"{'shape (B,H/Hkv,S,D)':<22}{'mask':<7}{'pass':<9}{'ringattn ms':>12}{'GFLOP/s':>9}"
            f"{'numpy ms':>10}{'x numpy':>9}{'torch ms':>10}{'x torch':>9}")
    lines += [head, "-" * len(head)]
    key = lambda r: (r["batch"], r["heads"], r["heads_kv"], r["seq"], r["dim"], r["causal"], r["pass"])
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["impl"]] = r
    for k_, g in groups.items():
        b, h, hk, s, d, causal, pass_ = k_
        ours = g["ringattn"]
        ms = lambda name: f"{g[name]['time_s'] * 1e3:.1f}" if name in g else "-"
        ratio = lambda name: f"{g[name]['speedup_vs']:.2f}x" if name in g else "-"
        lines.append(f"{f'({b},{h}/{hk},{s},{d})':<22}{'causal' if causal else 'full':<7}{pass_:<9}"
                     f"{ours['time_s'] * 1e3:>12.1f}{ours['gflops']:>9.1f}"
                     f"{ms('numpy'):>10}{ratio('numpy'):>9}{ms('torch'):>10}{ratio('torch'):>9}")
    return "\n".join(lines)


def machine():
    from .. import _cpu

    info = {"platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "isa": _cpu.active_isa(), "omp_threads": _cpu.max_threads(), "cpus": os.cpu_count()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if have_torch():
        import torch
        info["torch"] = torch.__version__
    return info


def run(args):
    from .. import _cpu

    if _cpu.max_threads() != args.threads or os.environ.get("OMP_NUM_THREADS") != str(args.threads):
        # OpenMP fixes its thread count when the library loads: rerun in a process that has it.
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        return subprocess.call([sys.executable, "-m", "ringattn", "bench", "kernel"] + sys.argv[sys.argv.index("kernel") + 1:],
                               env=env)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    print("$ ringattn bench kernel " + " ".join(sys.argv[sys.argv.index("kernel") + 1:] if "kernel" in sys.argv else []))
    info = machine()
    print(f"isa {info['isa']}, {args.threads} threads, {info['cpus']} cpus, load average {info.get('loadavg_start')}, "
          f"torch {info.get('torch', 'not installed')}; {args.repeats} interleaved repeats, medians, "
          f"{args.gap} s pause before each timed call")
    rows = bench(shapes, args.threads, args.repeats, use_torch=not args.no_torch,
                 progress=lambda m: print(m, file=sys.stderr, flush=True), gap=args.gap)
    print(format_table(rows))
    ratios = {}
    if not args.quick:
        lines, ratios = same_run_ratios(rows, args.repeats, args.gap)
        print("\n".join(lines))
    memory = []
    if not args.no_memory and not args.quick:
        for causal in (False, True):
            m = memory_check(args.threads, causal)
            memory.append(m)
            print(f"memory: forward seq {m['seq']} heads 1 dim {m['dim']} {'causal' if causal else 'full'}: peak RSS "
                  f"+{m['peak_rss_growth_mib']:.1f} MiB beyond {m['inputs_outputs_mib']:.1f} MiB of inputs/outputs "
                  f"(naive scores: {m['seq'] ** 2 * 4 / 2**30:.0f} GiB)")
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"load average at the end: {info.get('loadavg_end')}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": "ringattn bench kernel " + " ".join(sys.argv[sys.argv.index("kernel") + 1:]),
                       "machine": info, "rows": rows, "ratios": ratios, "memory": memory}, f, indent=1)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["memory"]:
    memory_child(sys.argv[2] == "1")
