"""`ringattn bench all`: the kernel, ring and training benchmarks in one go, one JSON, PNG plots.

    ringattn bench all                         # runs/bench-<time>/{all.json,all.txt,*.png}
    ringattn bench all --quick --out /tmp/x    # tiny sizes (smoke test, under a minute)
    ringattn bench all --skip train

It reuses the other benchmark modules rather than timing anything itself:
  kernel  ringattn.bench.kernel.bench() in this process (every thread), vs NumPy and PyTorch SDPA.
  ring    ringattn.bench.ring._launch(): `mpiexec -n P ... -m ringattn.bench.ring --worker ...`,
          one fresh launch per point, one OpenMP thread per rank:
            efficiency  P = 2, non-causal forward, sweeping the per-rank length (overlap worker)
            memory      P = 1, 2, 4, causal forward, per-rank peak RSS growth vs total length
            layouts     P = 4, causal forward and backward per layout (balance worker)
  train   `mpiexec -n P python -m mpi4py -m ringattn bench train` for P = 1, 2, (4); its JSON.

Plots (matplotlib, optional: without it the JSON is still written) live in ringattn.bench.plots;
each carries a footer with the machine, threads, ranks, date, commit and this command.
"""
import contextlib
import importlib.util
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from .. import machine
from ..progress import Progress

SECTIONS = ("kernel", "ring", "train")

# Sizes. Full: a few minutes on 2 cores. Quick: seconds (the test runs it).
FULL = {
    "kernel_repeats": 3, "kernel_gap": 0.2,
    "eff_seqs": [512, 1024, 2048, 4096, 8192, 16384, 32768], "eff_heads": 1, "eff_reps": 3,
    "mem_seqs": [4096, 16384, 65536], "mem_ranks": [1, 2, 4],
    "layout_seq": 8192, "layout_heads": 2, "layout_reps": 3,
    "train_ranks": [1, 2, 4], "train": ["--seq-len", "2048", "--batch", "16", "--steps", "2", "--repeats", "3"],
    "train_memory": ["--memory-shards", "1024,4096,16384,65536", "--memory-chunks", "64,256,1024"],
    "train_torch": True,
}
QUICK = {
    "kernel_repeats": 1, "kernel_gap": 0.0,
    "eff_seqs": [256, 1024], "eff_heads": 1, "eff_reps": 1,
    "mem_seqs": [2048, 8192], "mem_ranks": [1, 2, 4],  # per-rank arrays above malloc's mmap threshold
    "layout_seq": 256, "layout_heads": 1, "layout_reps": 1,
    "train_ranks": [1, 2], "train": ["--seq-len", "64", "--batch", "2", "--steps", "1", "--repeats", "1"],
    "train_memory": ["--memory-shards", "256,1024", "--memory-chunks", "64"],
    "train_torch": False,  # importing torch in each launch would cost more than the whole quick run
}


def add_arguments(p):
    p.add_argument("--out", default=None,
                   help="directory for all.json and the PNG plots (None: a new folder runs/bench-<time>)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, < 1 minute)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: " + ",".join(SECTIONS))
    p.add_argument("--no-torch", action="store_true", help="no PyTorch baselines even if installed")


# ---- small helpers ---------------------------------------------------------------------------
def parse_skip(text):
    skip = {s.strip() for s in text.split(",") if s.strip()}
    bad = skip - set(SECTIONS)
    if bad:
        raise ValueError(f"--skip: unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    return skip


def command_line():
    """The command as a user would type it (`ringattn bench all ...`), whatever the entry point."""
    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench"):]
    return shlex.join(["ringattn"] + argv)


def _mpiexec():
    return shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")


def _med(x):
    return float(np.median(x))


# ---- the measurements, one task per progress step --------------------------------------------
def kernel_tasks(cfg, quick, threads, use_torch, res):
    from . import kernel as K
    shapes = K.QUICK_SHAPES if quick else K.SHAPES
    res["kernel"] = {"threads": threads, "repeats": cfg["kernel_repeats"], "torch": use_torch and K.have_torch(),
                     "rows": []}

    def one(shape):
        def go():
            res["kernel"]["rows"] += K.bench([shape], threads, cfg["kernel_repeats"], use_torch=use_torch,
                                             progress=None, gap=cfg["kernel_gap"])
        return go

    return [(f"kernel B{b} H{h}/{hk} S{s} D{d}{' causal' if c else ''}", one((b, h, hk, s, d, c)))
            for (b, h, hk, s, d, c) in shapes]


def ring_tasks(cfg, res):
    from . import ring as R
    ring = res["ring"] = {"efficiency": [], "memory": [], "layouts": None,
                          "efficiency_setup": {"ranks": 2, "heads": cfg["eff_heads"], "dim": 64, "causal": False,
                                               "reps": cfg["eff_reps"], "pass": "fwd"},
                          "memory_setup": {"heads": 1, "dim": 64, "causal": True, "layout": "zigzag"},
                          "layouts_setup": {"ranks": 4, "seq": cfg["layout_seq"], "heads": cfg["layout_heads"],
                                            "dim": 64, "causal": True, "reps": cfg["layout_reps"]}}
    tasks = []

    def eff(S):
        def go():
            r = R._launch(2, ["--worker", "overlap", "--seq", S, "--heads", cfg["eff_heads"], "--reps", cfg["eff_reps"],
                              "--fwd-bwd", 0, "--modes", "thread,none"])
            base = _med(r["base_fwd"])
            ring["efficiency"].append({
                "seq": S, "per_rank": S // 2, "kernel_only_s": base,
                **{f"ring_{m}_s": _med(r[f"ring_fwd_{m}"]) for m in ("thread", "none")},
                **{f"efficiency_{m}": base / _med(r[f"ring_fwd_{m}"]) for m in ("thread", "none")},
                **{f"max_wait_{m}_s": _med(r[f"wait_fwd_{m}"]) for m in ("thread", "none")}, "raw": r})
        return go

    def mem(P, S):
        def go():
            r = R._launch(P, ["--worker", "memory", "--seq", S, "--heads", 1, "--reps", 1])
            ranks = r["ranks"]
            n = max(x["local_len"] for x in ranks)
            ring["memory"].append({"ranks": P, "seq": S, "per_rank": n,
                                   "peak_growth_mib": max(x["growth_mib"] for x in ranks),
                                   "budget_mib": R.memory_budget_bytes(P, n, n, 1, 64) / 2**20, "time_s": r["time_s"],
                                   "hwm_reset": all(x["hwm_reset"] for x in ranks), "raw": ranks})
        return go

    def layouts():
        r = R._launch(4, ["--worker", "balance", "--seq", cfg["layout_seq"], "--heads", cfg["layout_heads"],
                          "--reps", cfg["layout_reps"], "--fwd-bwd", 1])
        ring["layouts"] = {lay: {k: _med(r[f"{lay}_{k}"]) for k in ("fwd", "bwd", "fwd_cpu", "bwd_cpu")}
                           for lay in ("contiguous", "zigzag", "striped")}
        ring["layouts_raw"] = r

    tasks += [(f"ring efficiency P=2 S={S}", eff(S)) for S in cfg["eff_seqs"]]
    tasks += [(f"ring memory P={P} S={S}", mem(P, S)) for P in cfg["mem_ranks"] for S in cfg["mem_seqs"]]
    tasks.append((f"ring layouts P=4 S={cfg['layout_seq']}", layouts))
    return tasks


def train_tasks(cfg, use_torch, res, tmp):
    res["train"] = {"runs": []}

    def one(P, first):
        def go():
            prefix = os.path.join(tmp, f"train_p{P}")
            # FFN memory is per process and the same for every P: measure it once, with P = 1
            cmd = [_mpiexec(), "-n", str(P), sys.executable, "-m", "mpi4py", "-m", "ringattn", "bench", "train",
                   "--sp", str(P), "--out", prefix] + cfg["train"] + (cfg["train_memory"] if first else
                                                                    ["--memory-shards="])
            if not (use_torch and cfg["train_torch"]):
                cmd.append("--no-torch")
            env = dict(os.environ, OMP_NUM_THREADS="1")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode:
                raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
            with open(prefix + ".json") as f:
                res["train"]["runs"].append(json.load(f))
        return go

    return [(f"train P={P}", one(P, i == 0)) for i, P in enumerate(cfg["train_ranks"])]


# ---- summary text ----------------------------------------------------------------------------
def summary(res):
    lines = [f"# {res['machine']['command']}",
             f"# {res['machine']['cpu_model']}, {res['machine']['logical_cpus']} cpus, isa {res['machine']['isa']}, "
             f"{res['machine']['date']}, commit {res['machine']['git_commit']}"]
    k = res.get("kernel")
    if k and k.get("rows"):
        lines.append(f"kernel ({k['threads']} threads): GFLOP/s per shape and pass")
        groups = {}
        for r in k["rows"]:
            key = (f"B{r['batch']} H{r['heads']}/{r['heads_kv']} S{r['seq']} D{r['dim']}"
                   f"{' causal' if r['causal'] else ''} {r['pass']}")
            groups.setdefault(key, {})[r["impl"]] = r["gflops"]
        for key, g in groups.items():
            lines.append(f"  {key:<36}" + "".join(f" {n} {v:7.1f}" for n, v in g.items()))
    rg = res.get("ring")
    if rg:
        if rg.get("efficiency"):
            lines.append("ring efficiency (P=2, forward; kernel-calls-only time / ring time)")
            for e in rg["efficiency"]:
                lines.append(f"  per-rank {e['per_rank']:>6}: progress=thread {e['efficiency_thread']:.3f}  "
                             f"progress=none {e['efficiency_none']:.3f}")
        if rg.get("memory"):
            lines.append("ring memory (causal forward, per-rank peak RSS growth MiB / own arrays MiB)")
            for m in rg["memory"]:
                lines.append(f"  P={m['ranks']} S={m['seq']:>7}: {m['peak_growth_mib']:8.1f} / {m['budget_mib']:8.1f}")
        if rg.get("layouts"):
            lines.append("causal layouts (P=4): wall s and busiest-rank kernel CPU s, fwd | bwd")
            for lay, v in rg["layouts"].items():
                lines.append(f"  {lay:<11} {v['fwd']:.3f} {v['fwd_cpu']:.3f} | {v['bwd']:.3f} {v['bwd_cpu']:.3f}")
    t = res.get("train")
    if t and t.get("runs"):
        lines.append("training step tokens/s")
        for r in t["runs"]:
            extra = f"  (PyTorch {r['torch_tokens_per_s']:.0f})" if "torch_tokens_per_s" in r else ""
            lines.append(f"  P={r['ranks']}: {r['ringattn_tokens_per_s']:.0f}{extra}")
    for name in SECTIONS:
        if res.get(name, {}).get("error"):
            lines.append(f"{name}: FAILED: {res[name]['error'].splitlines()[0]}")
    return "\n".join(lines)


def run(args):
    from .. import _cpu
    try:
        skip = parse_skip(args.skip)
    except ValueError as e:
        print(f"ringattn bench all: {e}", file=sys.stderr)
        return 2
    cfg = QUICK if args.quick else FULL
    threads = _cpu.max_threads()
    use_torch = not args.no_torch
    res = {"machine": machine.machine_info(threads, command_line()), "quick": bool(args.quick), "skipped": sorted(skip)}
    ranks = ({1} if "kernel" not in skip else set()) | ({2, 4, *cfg["mem_ranks"]} if "ring" not in skip else set())
    res["machine"]["ranks"] = sorted(ranks | (set(cfg["train_ranks"]) if "train" not in skip else set()))
    from . import fresh_dir
    out = args.out or fresh_dir()
    os.makedirs(out, exist_ok=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="ringattn-bench-") as tmp:
        plan = []
        if "kernel" not in skip:
            plan.append(("kernel", kernel_tasks(cfg, args.quick, threads, use_torch, res)))
        if "ring" not in skip:
            plan.append(("ring", ring_tasks(cfg, res)))
        if "train" not in skip:
            plan.append(("train", train_tasks(cfg, use_torch, res, tmp)))
        bar = Progress(sum(len(t) for _, t in plan))
        log = io.StringIO()
        t0 = time.time()
        for section, tasks in plan:
            for label, fn in tasks:
                bar.start(label)
                if section not in failed:
                    try:
                        with contextlib.redirect_stdout(log):  # the modules' own prints would break the bar
                            fn()
                    except Exception as e:  # keep going: one broken section must not lose the others
                        failed.append(section)
                        res[section]["error"] = f"{label}: {type(e).__name__}: {e}"
                bar.step()
        bar.close()
    res["elapsed_s"] = time.time() - t0
    try:
        res["machine"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass
    res["log"] = log.getvalue()
    path = os.path.join(out, "all.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    text = summary(res)
    with open(os.path.join(out, "all.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"saved {path} and {os.path.join(out, 'all.txt')} ({res['elapsed_s']:.0f} s)")
    if importlib.util.find_spec("matplotlib") is None:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or the 'bench' extra)")
    else:
        from . import plots
        written = plots.write_all(res, out)
        print("plots: " + (", ".join(written) if written else "nothing to plot"))
    if failed:
        print(f"FAILED sections: {', '.join(failed)} (see 'error' in {path})", file=sys.stderr)
        return 1
    return 0
