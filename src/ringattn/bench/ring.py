"""`ringattn bench ring`: ring attention over MPI on this machine.

The command is a driver: it spawns `mpiexec -n P python -m mpi4py -m ringattn.bench.ring --worker ...`
once per measurement (so P = 2 and P = 4 runs, and each memory size, get fresh processes), with one
OpenMP thread per rank, and collects one JSON line from rank 0 of each.

  overlap   P = 2, non-causal: efficiency = (the same per-rank kernel calls, no messages) / (ring time),
            forward and forward+backward, progress by poller thread (default) and with none.
  balance   P = 4, causal: forward and backward time per layout, ratio to contiguous.
  window    P = 4, causal sliding window (--window-left): forward (+backward) time and ring steps vs
            total length at a fixed window, with the no-window causal time of the same launch, per layout.
  memory    P = 4, 1 head, dim 64: per-rank peak RSS growth of a causal forward vs the rank's own
            Q, K, V, out, lse plus two K/V buffers, for several total lengths.

Times: barrier, call, barrier (so the slowest rank counts), repeats interleaved, medians.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from .. import layout as L
from .. import machine


# ---------------------------------------------------------------------------------------------
# Worker side (runs under mpiexec)
# ---------------------------------------------------------------------------------------------
def _inputs(ring, total, heads, dim, seed=0):
    # Generated per rank in float32 directly: no full-sequence or float64 temporaries.
    rng = np.random.default_rng([seed, ring.rank])
    n = ring.local_len(total)
    return [rng.standard_normal((1, n, heads, dim), dtype=np.float32) for _ in range(4)]


def _timed(comm, fn):
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    comm.Barrier()
    return time.perf_counter() - t0


def _kv_blocks(ring, total, k, v):
    """For each ring step, a K/V block as long as the one arriving at that step (the shard of
    layout.block_owner), cut from this rank's own K/V: the kernel-only baseline does the ring's
    arithmetic on this rank without any message. Shards differ by at most a few tokens, so the
    own block extended by its first tokens covers the longest one."""
    lens = [L.local_len(total, ring.size, L.block_owner(ring.rank, ring.size, step), ring.layout)
            for step in range(ring.size)]
    extra = max(lens) - k.shape[1]
    kx, vx = ((np.concatenate([a, a[:, :extra]], axis=1) if extra > 0 else a) for a in (k, v))
    return [(kx[:, :nk], vx[:, :nk]) for nk in lens]


def _kernel_only_forward(q, blocks):
    """The forward kernel work ring.attention_forward (non-causal) does on this rank, with no messages:
    one public attention_forward of the local queries per arriving K/V block (partial results are
    not merged: only the time is used)."""
    from .. import api
    for kb, vb in blocks:
        out, lse = api.attention_forward(q, kb, vb)
    return out, lse


def _kernel_only_backward(do, q, out, lse, blocks):
    """The backward kernel work of ring.attention_backward (non-causal) on this rank, no messages."""
    from .. import api
    for kb, vb in blocks:
        api.attention_backward(do, q, kb, vb, out, lse)


def worker_overlap(comm, a):
    from ..ring import Ring
    rings = {m: Ring(comm, layout="contiguous", progress=m) for m in a.modes.split(",")}
    ring = next(iter(rings.values()))
    q, k, v, do = _inputs(ring, a.seq, a.heads, a.dim)
    out, lse = ring.attention_forward(q, k, v)  # warm up (buffers, threads)
    blocks = _kv_blocks(ring, a.seq, k, v)
    times = {key: [] for key in ("base_fwd", "ring_fwd_thread", "ring_fwd_none", "base_fb", "ring_fb_thread",
                                 "wait_fwd_thread", "wait_fwd_none", "wait_fb_thread")}

    def ring_fb(r):
        o, l = r.attention_forward(q, k, v)
        r.attention_backward(do, q, k, v, o, l)

    def base_fb():
        o, l = _kernel_only_forward(q, blocks)
        _kernel_only_backward(do, q, o, l, blocks)

    def ring_fwd(m, r):
        r.transport.wait_s = 0.0
        times[f"ring_fwd_{m}"].append(_timed(comm, lambda: r.attention_forward(q, k, v)))
        times[f"wait_fwd_{m}"].append(comm.allreduce(r.transport.wait_s, op=_max()))

    def ring_fb_timed():
        ring.transport.wait_s = 0.0
        times["ring_fb_thread"].append(_timed(comm, lambda: ring_fb(ring)))
        times["wait_fb_thread"].append(comm.allreduce(ring.transport.wait_s, op=_max()))

    jobs = [lambda: times["base_fwd"].append(_timed(comm, lambda: _kernel_only_forward(q, blocks)))]
    jobs += [lambda m=m, r=r: ring_fwd(m, r) for m, r in rings.items()]
    if a.fwd_bwd and "thread" in rings:
        jobs += [lambda: times["base_fb"].append(_timed(comm, base_fb)), ring_fb_timed]
    for rep in range(a.reps):
        for job in (jobs if rep % 2 == 0 else jobs[::-1]):  # ABBA order against drift in machine load
            job()
    return {k_: v_ for k_, v_ in times.items() if v_}


def worker_balance(comm, a):
    from ..ring import Ring
    layouts = ("contiguous", "zigzag", "striped")
    rings = {lay: Ring(comm, layout=lay) for lay in layouts}
    data = {lay: _inputs(rings[lay], a.seq, a.heads, a.dim) for lay in layouts}
    times = {f"{lay}_{w}": [] for lay in layouts for w in ("fwd", "bwd", "fwd_cpu", "bwd_cpu")}
    for lay in layouts:  # warm up
        rings[lay].attention_forward(*data[lay][:3], causal=True)

    def timed_cpu(key, t, fn):
        # wall time, and the kernel CPU time of the busiest rank: the critical path on dedicated cores
        t.compute_cpu_s = 0.0
        times[key].append(_timed(comm, fn))
        times[key + "_cpu"].append(max(comm.allgather(t.compute_cpu_s)))

    for _ in range(a.reps):
        for lay in layouts:
            q, k, v, do = data[lay]
            res, t = {}, rings[lay].transport
            timed_cpu(f"{lay}_fwd", t, lambda: res.update(o=rings[lay].attention_forward(q, k, v, causal=True)))
            o, l = res["o"]
            if a.fwd_bwd:
                timed_cpu(f"{lay}_bwd", t, lambda: rings[lay].attention_backward(do, q, k, v, o, l, causal=True))
    return {k_: v_ for k_, v_ in times.items() if v_}


def worker_window(comm, a):
    """Per total length and layout: causal forward (+backward) with the window and without, wall time and
    the busiest rank's kernel CPU time, repeats interleaved; the ring steps each call runs."""
    from ..mask import Mask, ring_steps
    from ..ring import Ring
    layouts = a.layouts.split(",")
    rings = {lay: Ring(comm, layout=lay) for lay in layouts}
    win = (a.window_left, 0)
    rows = []
    for S in (int(s) for s in a.seqs.split(",")):
        data = {lay: _inputs(rings[lay], S, a.heads, a.dim) for lay in layouts}
        times = {}
        for lay in layouts:
            rings[lay].attention_forward(*data[lay][:3], causal=True, window_size=win)  # warm up
        for rep in range(a.reps):
            order = [(lay, w) for lay in layouts for w in (win, None)]
            for lay, w in (order if rep % 2 == 0 else order[::-1]):
                q, k, v, do = data[lay]
                ring, t, key = rings[lay], rings[lay].transport, f"{lay}_{'win' if w else 'full'}"

                def call():
                    o, l = ring.attention_forward(q, k, v, causal=True, window_size=w)
                    if a.fwd_bwd:
                        ring.attention_backward(do, q, k, v, o, l, causal=True, window_size=w)
                t.compute_cpu_s = 0.0
                times.setdefault(key, []).append(_timed(comm, call))
                times.setdefault(key + "_cpu", []).append(max(comm.allgather(t.compute_cpu_s)))
        for lay in layouts:
            rows.append({"seq": S, "layout": lay, "window_left": a.window_left,
                         "steps_win": ring_steps(Mask.of(True, win), S, comm.size, lay),
                         "steps_full": ring_steps(Mask.of(True), S, comm.size, lay),
                         **{k_: v_ for k_, v_ in times.items() if k_.startswith(lay + "_")}})
            rows[-1] = {k_.replace(lay + "_", "", 1) if k_.startswith(lay + "_") else k_: v_ for k_, v_ in rows[-1].items()}
    return {"window_left": a.window_left, "ranks": comm.size, "fwd_bwd": a.fwd_bwd, "rows": rows}


def memory_budget_bytes(ranks, n, nmax, heads, dim):
    """What a rank must hold in a float32 causal ring forward: its own Q, K, V, out (n tokens each)
    and lse, plus two K/V buffers (the block being used and the one arriving) when there is a ring,
    i.e. ranks > 1; the buffers are sized for the longest shard, nmax."""
    own = 4 * n * heads * dim * 4 + n * heads * 4
    return own + (2 * 2 * nmax * heads * dim * 4 if ranks > 1 else 0)


def worker_memory(comm, a):
    from ..ring import Ring
    ring = Ring(comm, layout="zigzag")
    # warm the kernels and MPI on a tiny problem so their one-time allocations sit in the baseline
    tiny = _inputs(ring, 64 * ring.size, a.heads, a.dim, seed=1)
    ring.attention_forward(*tiny[:3], causal=True)
    ring.transport.release()
    del tiny
    comm.Barrier()
    reset = machine.reset_peak_rss()
    base = machine.rss_kib("VmRSS")
    q, k, v = _inputs(ring, a.seq, a.heads, a.dim)[:3]
    t = _timed(comm, lambda: ring.attention_forward(q, k, v, causal=True))
    peak = machine.peak_rss_kib()
    n = q.shape[1]
    own = memory_budget_bytes(ring.size, n, max(comm.allgather(n)), a.heads, a.dim)
    rows = comm.gather({"rank": ring.rank, "local_len": n, "growth_mib": (peak - base) / 1024,
                        "budget_mib": own / 2**20, "baseline_mib": base / 1024, "hwm_reset": reset})
    return {"seq": a.seq, "time_s": t, "ranks": rows}


def _max():
    from mpi4py import MPI
    return MPI.MAX


def worker_main(argv):
    import argparse
    from mpi4py import MPI
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True, choices=("overlap", "balance", "window", "memory"))
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fwd-bwd", type=int, default=1)
    p.add_argument("--modes", default="thread,none", help="overlap: progress modes to time")
    p.add_argument("--seqs", default="", help="window: total lengths")
    p.add_argument("--window-left", type=int, default=256)
    p.add_argument("--layouts", default="contiguous,zigzag,striped")
    a = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    res = {"overlap": worker_overlap, "balance": worker_balance, "window": worker_window,
           "memory": worker_memory}[a.worker](comm, a)
    if comm.rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver side (`ringattn bench ring`)
# ---------------------------------------------------------------------------------------------
def add_arguments(p):
    p.add_argument("--only", default="overlap,balance,window,memory", help="comma-separated subset to run")
    p.add_argument("--reps", type=int, default=3, help="interleaved repeats per timing (median reported)")
    p.add_argument("--overlap-seq", type=int, default=16384)
    p.add_argument("--overlap-heads", type=int, default=8)
    p.add_argument("--balance-seq", type=int, default=16384)
    p.add_argument("--balance-heads", type=int, default=4)
    p.add_argument("--window-seqs", default="4096,8192,16384", help="window: total lengths at a fixed window")
    p.add_argument("--window-left", type=int, default=256, help="window: causal window, keys back per query")
    p.add_argument("--window-heads", type=int, default=4)
    p.add_argument("--window-layouts", default="contiguous,zigzag,striped")
    p.add_argument("--memory-seqs", default="16384,65536,262144")
    p.add_argument("--no-backward", action="store_true", help="forward only (faster)")
    p.add_argument("--async-progress", type=int, default=1, help="also time MPIR_CVAR_ASYNC_PROGRESS=1 (MPICH)")
    p.add_argument("--out", default=None,
                   help="path prefix for .txt and .json (None: runs/bench-<time>/ring_cpu in a new folder)")


def _launch(n, args, env=None, timeout=1800):
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "ringattn.bench.ring"] + [str(x) for x in args]
    e = dict(os.environ, OMP_NUM_THREADS="1")
    e.update(env or {})
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    print(f"  ({' '.join(cmd[1:3])} --worker {args[1]} ... took {time.time() - t0:.0f}s)", flush=True)
    return json.loads(line[len("RESULT "):])


def _med(x):
    return float(np.median(x))


def _eff(base, ring):
    """Median over repeats of the paired ratio base_i / ring_i (robust to slow drift in load)."""
    return float(np.median(np.asarray(base) / np.asarray(ring)))


def run(args):
    from .. import _cpu
    only = set(args.only.split(","))
    fb = 0 if args.no_backward else 1
    lines, results = [], {"command": "ringattn bench ring " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "ring"] else sys.argv[1:]),
                          "machine": f"{os.cpu_count()} cores, isa {_cpu.active_isa()}, OMP_NUM_THREADS=1 per rank",
                          "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out(f"ringattn bench ring   ({results['machine']}; {results['date']})")
    out(f"command: {results['command']}")
    ncpu = os.cpu_count() or 1

    if "overlap" in only:
        S, H = args.overlap_seq, args.overlap_heads
        r = _launch(2, ["--worker", "overlap", "--seq", S, "--heads", H, "--reps", args.reps, "--fwd-bwd", fb])
        results["overlap"] = r
        out()
        out(f"== overlap: P=2, seq {S}, {H} heads, dim 64, float32, non-causal"
            + (" (2 ranks on %d cores)" % ncpu))
        out(f"{'what':34s} {'median s':>9s} {'efficiency':>10s} {'max wait s':>10s}")
        bf = _med(r["base_fwd"])
        out(f"{'fwd: kernel calls only (baseline)':34s} {bf:9.3f} {'1.000':>10s} {'-':>10s}")
        for m in ("thread", "none"):
            t = _med(r[f"ring_fwd_{m}"])
            out(f"{'fwd: ring, progress=' + m:34s} {t:9.3f} {_eff(r['base_fwd'], r[f'ring_fwd_{m}']):10.3f} "
                f"{_med(r[f'wait_fwd_{m}']):10.4f}")
        if args.async_progress:
            # MPICH's own progress thread (needs MPI_THREAD_MULTIPLE, which mpi4py requests by default);
            # it spins, so on a machine with one core per rank it competes with the kernels.
            ra = _launch(2, ["--worker", "overlap", "--seq", S, "--heads", H, "--reps", args.reps, "--fwd-bwd", 0,
                             "--modes", "none"], env={"MPIR_CVAR_ASYNC_PROGRESS": "1"})
            results["overlap_async_progress"] = ra
            t, b = _med(ra["ring_fwd_none"]), _med(ra["base_fwd"])
            out(f"{'fwd: ring, MPICH async progress':34s} {t:9.3f} {_eff(ra['base_fwd'], ra['ring_fwd_none']):10.3f} "
                f"{_med(ra['wait_fwd_none']):10.4f}"
                f"   (own baseline {b:.3f} s, same launch)")
        if "base_fb" in r:
            bb, tb = _med(r["base_fb"]), _med(r["ring_fb_thread"])
            out(f"{'fwd+bwd: kernel calls only':34s} {bb:9.3f} {'1.000':>10s} {'-':>10s}")
            out(f"{'fwd+bwd: ring, progress=thread':34s} {tb:9.3f} {_eff(r['base_fb'], r['ring_fb_thread']):10.3f} "
                f"{_med(r['wait_fb_thread']):10.4f}")

    if "balance" in only:
        S, H = args.balance_seq, args.balance_heads
        r = _launch(4, ["--worker", "balance", "--seq", S, "--heads", H, "--reps", args.reps, "--fwd-bwd", fb])
        results["balance"] = r
        out()
        out(f"== causal load balance: P=4, seq {S}, {H} heads, dim 64, float32"
            + (f" (4 ranks OVERSUBSCRIBE {ncpu} cores)" if ncpu < 4 else ""))
        out("   wall: measured time (oversubscribed here); crit: kernel CPU seconds of the busiest rank, the")
        out("   time the slowest rank needs on dedicated cores (what P=4 on 4 cores would show)")
        out(f"{'layout':12s} {'fwd wall':>8s} {'ratio':>6s} {'crit':>7s} {'ratio':>6s} | {'bwd wall':>8s} {'ratio':>6s} {'crit':>7s} {'ratio':>6s}")
        for lay in ("contiguous", "zigzag", "striped"):
            row = f"{lay:12s}"
            for w in ("fwd", "bwd"):
                if not r.get(f"{lay}_{w}"):
                    continue
                f, f0 = _med(r[f"{lay}_{w}"]), _med(r[f"contiguous_{w}"])
                c, c0 = _med(r[f"{lay}_{w}_cpu"]), _med(r[f"contiguous_{w}_cpu"])
                row += (" |" if w == "bwd" else "") + f" {f:8.3f} {f / f0:6.3f} {c:7.3f} {c / c0:6.3f}"
            out(row)

    if "window" in only:
        r = _launch(4, ["--worker", "window", "--seqs", args.window_seqs, "--window-left", args.window_left,
                        "--heads", args.window_heads, "--reps", args.reps, "--fwd-bwd", fb,
                        "--layouts", args.window_layouts])
        results["window"] = r
        out()
        out(f"== sliding window: P=4, causal, window_size=({args.window_left}, 0), {args.window_heads} heads, dim 64,"
            f" float32, {'fwd+bwd' if fb else 'fwd'}" + (f" (4 ranks OVERSUBSCRIBE {ncpu} cores)" if ncpu < 4 else ""))
        out("   win: with the window; full: causal, no window, same launch; crit: busiest rank's kernel CPU s;")
        out("   ratio: median of the paired win/full ratios; steps: ring steps run")
        out(f"{'seq':>7s} {'layout':11s} {'steps':>5s} {'win wall':>8s} {'full wall':>9s} {'ratio':>6s} "
            f"{'win crit':>8s} {'full crit':>9s} {'ratio':>6s}")
        for row in r["rows"]:
            out(f"{row['seq']:7d} {row['layout']:11s} {row['steps_win']:>2d}/{row['steps_full']:<2d} "
                f"{_med(row['win']):8.3f} {_med(row['full']):9.3f} {_eff(row['win'], row['full']):6.3f} "
                f"{_med(row['win_cpu']):8.3f} {_med(row['full_cpu']):9.3f} {_eff(row['win_cpu'], row['full_cpu']):6.3f}")

    if "memory" in only:
        results["memory"] = []
        out()
        out("== memory: P=4, zigzag, causal forward, 1 head, dim 64, float32; per-rank peak RSS growth over the")
        out("   baseline after imports and warm-up, vs the rank's own Q, K, V, out, lse + two K/V buffers")
        out(f"{'seq':>8s} {'S/P':>7s} {'time s':>7s} {'budget MiB':>10s} {'peak growth MiB (ranks 0..3)':>32s} {'max ratio':>9s}")
        for S in (int(s) for s in args.memory_seqs.split(",")):
            r = _launch(4, ["--worker", "memory", "--seq", S, "--heads", 1, "--reps", 1])
            results["memory"].append(r)
            ranks = sorted(r["ranks"], key=lambda x: x["rank"])
            ratio = max(x["growth_mib"] / x["budget_mib"] for x in ranks)
            grow = " ".join(f"{x['growth_mib']:7.1f}" for x in ranks)
            out(f"{S:8d} {S // 4:7d} {r['time_s']:7.1f} {ranks[0]['budget_mib']:10.1f} {grow:>32s} {ratio:9.3f}")

    out()
    out("notes:")
    out("- efficiency = kernel-calls-only time / ring time, same launch, repeats interleaved (ABBA), median")
    out("  of the paired ratios.")
    out("  'max wait s': time in the transport's wait per call, slowest rank: exposed communication plus skew between ranks.")
    out("- progress: the MPICH wheel moves a large message only inside MPI calls; progress=thread (default)")
    out("  polls Testall from a sleeping helper thread while the kernel runs, progress=none leaves the copy")
    out("  to Wait after the compute. MPICH async progress spins one extra thread per rank.")
    out("- this machine has %d cores: P=4 runs oversubscribe them, so wall-time ratios of the causal layouts" % ncpu)
    out("  understate the balance (an idle rank's core is taken by a busy one); 'crit' is the busiest rank's")
    out("  kernel CPU time, i.e. the wall time with one core per rank. Timings are noisy when the machine is shared.")
    from . import out_prefix
    prefix = out_prefix(args.out, "ring_cpu")
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(prefix + ".txt", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"\nsaved {prefix}.txt and {prefix}.json")
    return 0


if __name__ == "__main__":
    worker_main(sys.argv[1:])
