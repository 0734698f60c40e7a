"""PNG plots for `ringattn bench all`, drawn from its JSON (matplotlib, imported only here).

Every figure carries a footer: machine, threads, ranks, date, commit and the command that made it,
so a PNG copied into a report or an issue still says where its numbers come from.

    python -m ringattn.bench.plots benchmarks/results/all/all.json   # redraw from a saved JSON
    python -m ringattn.bench.plots --curve out.png run.jsonl [...]    # training curves (--metrics-out)
"""
import json
import os
import sys
import textwrap

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def footer(res, what):
    m = res["machine"]
    return (f"{m['cpu_model']}, {m['logical_cpus']} logical cpus, isa {m['isa']}; {what}; "
            f"{m['date']}, commit {m['git_commit']}; load avg {_load(m)}\n$ {m['command']}")


def _load(m):
    a, b = m.get("loadavg_start"), m.get("loadavg_end")
    return f"{a[0]:.1f} -> {b[0]:.1f}" if a and b else "?"


def _plain_log_labels(ax):
    """Log axis labelled 0.5, 1, 2 rather than 5x10^-1 (easier to read off MiB)."""
    from matplotlib.ticker import FuncFormatter
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def _finish(plt, fig, res, what, path):
    return _save(plt, fig, footer(res, what), path)


def _save(plt, fig, text, path):
    """Write the figure with `text` as a wrapped monospace footer."""
    # monospace at 6.5 pt: about 18 characters per inch of figure width
    text = "\n".join(textwrap.fill(line, int(fig.get_figwidth() * 17)) for line in text.splitlines())
    fig.text(0.01, 0.01, text, fontsize=6.5, va="bottom", ha="left", family="monospace")
    fig.tight_layout(rect=(0, (text.count("\n") + 1.5) * 0.11 / fig.get_figheight(), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernel(res, path):
    """(1) GFLOP/s per shape, ringattn vs NumPy vs PyTorch SDPA, forward and forward+backward."""
    plt = _plt()
    k = res["kernel"]
    impls = [i for i in ("ringattn", "torch", "numpy") if any(r["impl"] == i for r in k["rows"])]
    names = {"ringattn": "ringattn", "torch": "PyTorch SDPA", "numpy": "NumPy (float32)"}
    passes = [p for p in ("fwd", "fwd+bwd") if any(r["pass"] == p for r in k["rows"])]
    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4.8), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        rows = [r for r in k["rows"] if r["pass"] == pass_]
        shapes = list(dict.fromkeys((r["batch"], r["heads"], r["heads_kv"], r["seq"], r["dim"], r["causal"])
                                    for r in rows))
        x = np.arange(len(shapes))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            vals = [next((r["gflops"] for r in rows if r["impl"] == impl and
                          (r["batch"], r["heads"], r["heads_kv"], r["seq"], r["dim"], r["causal"]) == s), 0.0)
                    for s in shapes]
            bars = ax.bar(x + (i - (len(impls) - 1) / 2) * width, vals, width, label=names[impl])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(x, [f"B{b} H{h}/{hk}\nS{s} D{d}\n{'causal' if c else 'full'}" for b, h, hk, s, d, c in shapes],
                      fontsize=8)
        ax.set_ylabel("GFLOP/s (FlashAttention FLOP count)")
        ax.set_title(f"attention kernel, float32, {pass_}")
        ax.legend(fontsize=8)
    return _finish(plt, fig, res, f"1 process, {k['threads']} threads each, medians of {k['repeats']} interleaved "
                   "repeats", path)


def plot_ring_efficiency(res, path):
    """(2) ring time vs the same kernel calls without messages, against the per-rank length."""
    plt = _plt()
    r = res["ring"]
    pts = sorted(r["efficiency"], key=lambda e: e["per_rank"])
    n = [e["per_rank"] for e in pts]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(n, [e["efficiency_thread"] for e in pts], "o-", label="progress=thread (default)")
    ax.plot(n, [e["efficiency_none"] for e in pts], "s--", label="progress=none")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n], fontsize=8)
    ax.set_xlabel("per-rank sequence length (tokens)")
    ax.set_ylabel("efficiency = kernel-only time / ring time")
    ax.set_ylim(0, max(1.1, max(e["efficiency_thread"] for e in pts) * 1.05))
    s = r["efficiency_setup"]
    ax.set_title(f"ring attention: communication hidden where efficiency ~ 1\n"
                 f"P={s['ranks']}, {s['heads']} head(s), dim {s['dim']}, non-causal forward, float32")
    ax.legend(fontsize=8)
    return _finish(plt, fig, res, f"{s['ranks']} MPI ranks, 1 thread each, medians of {s['reps']} repeats", path)


def plot_memory(res, path):
    """(3) per-rank peak memory vs total length for P = 1, 2, 4: it follows S/P."""
    plt = _plt()
    r = res["ring"]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ranks = sorted({m["ranks"] for m in r["memory"]})
    for i, P in enumerate(ranks):
        pts = sorted((m for m in r["memory"] if m["ranks"] == P), key=lambda m: m["seq"])
        # P=1 and P=2 can coincide (P=1 needs no K/V buffers): distinct markers keep both visible
        line, = ax.plot([m["seq"] for m in pts], [m["peak_growth_mib"] for m in pts], "-" + "osv^D"[i % 5],
                        ms=9 - 2 * i, label=f"P={P} measured")
        ax.plot([m["seq"] for m in pts], [m["budget_mib"] for m in pts], ":", color=line.get_color(),
                label=f"P={P} own Q,K,V,out,lse" + (" + 2 K/V buffers" if P > 1 else " (no ring)"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqs = sorted({m["seq"] for m in r["memory"]})
    ax.set_xticks(seqs, [str(v) for v in seqs], fontsize=8)
    _plain_log_labels(ax)
    ax.set_xlabel("total sequence length (tokens)")
    ax.set_ylabel("per-rank peak RSS growth (MiB, max over ranks)")
    s = r["memory_setup"]
    ax.set_title(f"memory per rank follows S/P\ncausal ring forward, {s['layout']}, {s['heads']} head, dim {s['dim']}, "
                 "float32")
    ax.legend(fontsize=7)
    return _finish(plt, fig, res, f"P = {', '.join(map(str, ranks))} MPI ranks, 1 thread each", path)


def plot_layouts(res, path):
    """(4) causal layouts: wall time and the busiest rank's kernel CPU time, forward and backward."""
    plt = _plt()
    r = res["ring"]
    lay = r["layouts"]
    names = list(lay)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, (key, label) in zip(axes, (("", "wall time (s)"), ("_cpu", "busiest rank's kernel CPU time (s)"))):
        x = np.arange(len(names))
        for i, w in enumerate(("fwd", "bwd")):
            vals = [lay[n][w + key] for n in names]
            base = lay["contiguous"][w + key]
            bars = ax.bar(x + (i - 0.5) * 0.4, vals, 0.4, label=w)
            ax.bar_label(bars, labels=[f"{v / base:.2f}x" for v in vals], fontsize=7)
        ax.set_xticks(x, names)
        ax.set_ylabel(label)
        ax.set_title(label.split(" (")[0] + "\n(labels: ratio to contiguous)", fontsize=10)
        ax.legend(fontsize=8)
    s = r["layouts_setup"]
    cpus = res["machine"]["logical_cpus"]
    fig.suptitle(f"causal ring attention layouts, P={s['ranks']}, seq {s['seq']}, {s['heads']} heads, dim {s['dim']}"
                 + (f" ({s['ranks']} ranks on {cpus} cpus: wall time oversubscribed, CPU time = dedicated cores)"
                    if cpus and cpus < s["ranks"] else ""), fontsize=10)
    return _finish(plt, fig, res, f"{s['ranks']} MPI ranks, 1 thread each, medians of {s['reps']} repeats", path)


def plot_train(res, path):
    """(extra) training step tokens/s per rank count, next to PyTorch; FFN memory flat in tokens."""
    plt = _plt()
    runs = sorted(res["train"]["runs"], key=lambda r: r["ranks"])
    mem = next((r["ffn_memory_kib"] for r in runs if r.get("ffn_memory_kib")), [])
    fig, axes = plt.subplots(1, 2 if mem else 1, figsize=(11 if mem else 6, 4.6), squeeze=False)
    ax = axes[0][0]
    P = [r["ranks"] for r in runs]
    x = np.arange(len(runs))
    has_torch = all("torch_tokens_per_s" in r for r in runs)
    w = 0.4 if has_torch else 0.8
    bars = ax.bar(x - (w / 2 if has_torch else 0), [r["ringattn_tokens_per_s"] for r in runs], w,
                  label="ringattn (sequence-parallel over P ranks, 1 thread each)")
    ax.bar_label(bars, fmt="%.0f", fontsize=7)
    if has_torch:  # measured in the same launch, interleaved with ringattn: compare within a pair
        bars = ax.bar(x + w / 2, [r["torch_tokens_per_s"] for r in runs], w,
                      label=f"PyTorch CPU, 1 process, {runs[0].get('torch_threads', '?')} threads (same launch)")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [str(p) for p in P])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    r0 = runs[0]
    ax.set_xlabel("MPI ranks P (ring over all of them)")
    ax.set_ylabel("tokens/s (forward+backward+AdamW)")
    ax.set_title(f"training step, width {r0['width']}, {r0['layers']} layers, {r0['heads']} heads,\n"
                 f"seq {r0['seq_len']} x batch {r0['batch']}", fontsize=10)
    ax.legend(fontsize=8)
    if mem:
        ax = axes[0][1]
        for c in sorted({m["chunk"] for m in mem}):
            pts = sorted((m for m in mem if m["chunk"] == c), key=lambda m: m["shard"])
            ax.plot([m["shard"] for m in pts], [max(m["measured"], 1) / 1024 for m in pts], "o-", label=f"chunk {c}")
        pts = sorted({m["shard"]: m for m in mem}.values(), key=lambda m: m["shard"])
        ax.plot([m["shard"] for m in pts], [m["naive_hidden"] / 1024 for m in pts], "k:", label="non-blockwise hidden")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _plain_log_labels(ax)
        ax.set_xticks([m["shard"] for m in pts], [str(m["shard"]) for m in pts], fontsize=8)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("FFN fwd+bwd peak RSS growth (MiB)")
        ax.set_title(f"blockwise FFN memory (width {r0['width']})", fontsize=10)
        ax.legend(fontsize=8)
    return _finish(plt, fig, res, f"P = {', '.join(map(str, P))} MPI ranks, OMP_NUM_THREADS={r0.get('omp_threads')} "
                   "per rank", path)


def write_all(res, out):
    """Every plot whose data is in `res`; returns the paths written."""
    written = []
    k, r, t = res.get("kernel") or {}, res.get("ring") or {}, res.get("train") or {}
    jobs = [(k.get("rows"), plot_kernel, "kernel_gflops.png"),
            (r.get("efficiency"), plot_ring_efficiency, "ring_efficiency.png"),
            (r.get("memory"), plot_memory, "ring_memory.png"),
            (r.get("layouts"), plot_layouts, "ring_layouts.png"),
            (t.get("runs"), plot_train, "train.png")]
    for data, fn, name in jobs:
        if data:
            written.append(fn(res, os.path.join(out, name)))
    return written


def read_metrics(path):
    """A --metrics-out file -> (logged steps, evaluations, final summary or None)."""
    steps, evals, final = [], [], None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("final"):
                final = row
            elif "loss" in row:
                steps.append(row)
            elif "eval_accuracy" in row:
                evals.append(row)
    return steps, evals, final


def plot_curves(paths, path):
    """Training curves of `ringattn train --metrics-out` runs against wall time: loss, and train
    accuracy (recent window) with the held-out evaluations as dots. The footer names the machine
    this is drawn on (run it where the runs were made), the runs' rank counts and the command."""
    from ..machine import cpu_model
    plt = _plt()
    ranks = set()
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(11, 4.4))
    for p in paths:
        steps, evals, final = read_metrics(p)
        t = [r["elapsed_s"] for r in steps]
        label = f"final length {steps[-1]['seq_len']}" if steps else os.path.basename(p)
        if final:
            label += f": {final['eval_accuracy']:.3f} at {final['time_s']:.0f} s"
            ranks.add(final["ranks"])
        line, = ax_l.plot(t, [r["loss"] for r in steps], lw=1, label=label)
        ax_a.plot(t, [r["window_accuracy"] for r in steps], lw=1, color=line.get_color(), label=label)
        ax_a.plot([e["elapsed_s"] for e in evals], [e["eval_accuracy"] for e in evals], "o", ms=3,
                  color=line.get_color())
        for prev, cur in zip(steps, steps[1:]):  # curriculum stage changes
            if cur["seq_len"] != prev["seq_len"]:
                ax_a.axvline(cur["elapsed_s"], color=line.get_color(), lw=0.5, ls=":")
    ax_l.set_yscale("log")
    ax_l.set(xlabel="wall time (s)", ylabel="training loss", title="loss")
    ax_a.axhline(0.95, color="k", lw=0.6, ls="--")
    ax_a.set(xlabel="wall time (s)", ylabel="accuracy", ylim=(0, 1.02),
             title="train accuracy (line), held-out at the final length (dots)\ndotted: curriculum stage changes")
    ax_l.legend(fontsize=8)
    note = (f"{cpu_model()}, {os.cpu_count()} logical cpus; {'/'.join(map(str, sorted(ranks))) or '?'} MPI ranks\n"
            f"$ python -m ringattn.bench.plots --curve {path} {' '.join(paths)}")
    return _save(plt, fig, note, path)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--curve":
        print(plot_curves(sys.argv[3:], sys.argv[2]))
        sys.exit(0)
    src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/all/all.json"
    with open(src) as f:
        print("\n".join(write_all(json.load(f), os.path.dirname(os.path.abspath(src)))))
