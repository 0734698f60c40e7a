"""`ringattn bench all --quick`: every section measured, positive numbers, plots when matplotlib is there."""
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, timeout):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ringattn", "bench", "all"] + args, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _positive(x):
    return isinstance(x, (int, float)) and x > 0 and x == x and x != float("inf")


def test_bench_all_quick(tmp_path):
    out = tmp_path / "all"
    p = _run(["--quick", "--out", str(out)], timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "all.json").read_text())

    m = res["machine"]
    for key in ("cpu_model", "logical_cpus", "kernel_threads", "ranks", "date", "command", "git_commit", "isa"):
        assert key in m, key
    assert m["command"].startswith("ringattn bench all") and "--quick" in m["command"]
    assert m["logical_cpus"] >= 1 and m["kernel_threads"] >= 1 and 4 in m["ranks"]

    # kernel: every quick shape, both passes, ringattn and NumPy rows with positive GFLOP/s
    from ringattn.bench.kernel import QUICK_SHAPES
    rows = res["kernel"]["rows"]
    assert "error" not in res["kernel"]
    for impl in ("ringattn", "numpy"):
        mine = [r for r in rows if r["impl"] == impl]
        assert len(mine) == 2 * len(QUICK_SHAPES), impl
        assert all(_positive(r["gflops"]) and _positive(r["time_s"]) for r in mine)

    ring = res["ring"]
    assert "error" not in ring
    assert len(ring["efficiency"]) >= 2
    for e in ring["efficiency"]:
        for key in ("kernel_only_s", "ring_thread_s", "ring_none_s", "efficiency_thread", "efficiency_none"):
            assert _positive(e[key]), (key, e)
        assert e["per_rank"] == e["seq"] // 2
    assert {mm["ranks"] for mm in ring["memory"]} == {1, 2, 4}
    for mm in ring["memory"]:
        assert _positive(mm["peak_growth_mib"]) and _positive(mm["budget_mib"]), mm
        assert mm["per_rank"] >= mm["seq"] // mm["ranks"]
    assert set(ring["layouts"]) == {"contiguous", "zigzag", "striped"}
    for lay, v in ring["layouts"].items():
        assert all(_positive(v[k]) for k in ("fwd", "bwd", "fwd_cpu", "bwd_cpu")), (lay, v)

    train = res["train"]
    if "skipped" not in train:
        assert "error" not in train, train.get("error")
        assert sorted(r["ranks"] for r in train["runs"]) == [1, 2]
        assert all(_positive(r["ringattn_tokens_per_s"]) for r in train["runs"])

    assert (out / "all.txt").read_text().startswith("# ringattn bench all")
    pngs = ["kernel_gflops.png", "ring_efficiency.png", "ring_memory.png", "ring_layouts.png"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped" in p.stdout
        pytest.skip("matplotlib not installed: JSON checked, plots not")
    for name in pngs + ([] if "skipped" in train else ["train.png"]):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_bench_all_skip(tmp_path):
    out = tmp_path / "none"
    p = _run(["--skip", "kernel,ring,train", "--out", str(out)], timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((out / "all.json").read_text())
    assert res["skipped"] == ["kernel", "ring", "train"]
    assert not any(k in res for k in ("kernel", "ring", "train"))
    assert not list(out.glob("*.png"))

    p = _run(["--skip", "kernal", "--out", str(out)], timeout=60)
    assert p.returncode == 2 and "unknown section(s) kernal" in p.stderr


def test_progress_without_tqdm(monkeypatch, capsys):
    from ringattn.progress import Progress
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails: plain numbered lines instead
    bar = Progress(2)
    assert bar.bar is None
    for label in ("first", "second"):
        bar.start(label)
        bar.step()
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["[1/2] first ...", "[2/2] second ..."]


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    from ringattn.bench import all as A
    monkeypatch.setattr(A.importlib.util, "find_spec", lambda name: None)  # nothing optional is installed

    class Args:
        out, quick, skip, no_torch = str(tmp_path), True, "kernel,ring,train", True

    assert A.run(Args()) == 0
    assert "plots skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (tmp_path / "all.json").exists() and not list(tmp_path.glob("*.png"))


def test_bench_kernel_ratios_are_measured_in_the_same_run(monkeypatch):
    """The same-run block of `bench kernel`: sgemm share, paired causal/full ratio, slowest torch ratio,
    and the printed lines carry the measured numbers."""
    from ringattn.bench import kernel as K
    monkeypatch.setattr(K, "SHAPES", [(1, 2, 2, 512, 64, False)])
    rows = [{"impl": "ringattn", "pass": "fwd", "causal": False, "gflops": 10.0, "threads": 1},
            {"impl": "torch", "pass": "fwd", "causal": False, "speedup_vs": 1.25, "threads": 1}]
    lines, out = K.same_run_ratios(rows, repeats=3, gap=0.0)
    assert _positive(out["sgemm_gflops"]) and out["full_fwd_vs_sgemm"] == 10.0 / out["sgemm_gflops"]
    assert len(out["causal_over_full_all"]) == 3 and all(_positive(r) for r in out["causal_over_full_all"])
    assert out["causal_over_full_fwd"] == sorted(out["causal_over_full_all"])[1]
    assert out["min_vs_torch"] == 1.25 and lines[-1].endswith("vs torch over all rows: 1.25x")
    assert f"{out['sgemm_gflops']:.1f} GFLOP/s" in lines[0] and f"= {100 * out['full_fwd_vs_sgemm']:.0f}% of sgemm" in lines[0]
    assert f": {out['causal_over_full_fwd']:.3f} (median of 3 alternating pairs" in lines[1]
    assert not any("target" in line for line in lines)


def test_training_curves_from_metrics_files(tmp_path):
    from ringattn.bench import plots
    rows = [{"step": 10, "loss": 3.0, "window_accuracy": 0.1, "seq_len": 12, "elapsed_s": 1.0},
            {"step": 20, "loss": 1.0, "window_accuracy": 0.9, "seq_len": 32, "elapsed_s": 2.0},
            {"eval_accuracy": 0.5, "eval_loss": 1.2, "seq_len": 32, "step": 20, "elapsed_s": 2.1},
            {"final": True, "step": 20, "eval_accuracy": 0.5, "eval_loss": 1.2, "time_s": 2.2, "ranks": 2}]
    src = tmp_path / "run.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, evals, final = plots.read_metrics(src)
    assert [s["step"] for s in steps] == [10, 20] and len(evals) == 1 and final["ranks"] == 2
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (the plot extra)")
    png = tmp_path / "curves.png"
    assert plots.plot_curves([str(src)], str(png)) == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _digest(folder):
    """{relative path: sha256} of every file under folder."""
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


# the cheapest path through each benchmark's writer: tiny sizes, no PyTorch, no sections for `all`
_CHEAP = {
    "all": ["--skip", "kernel,ring,train"],
    "ring": ["--only", "memory", "--memory-seqs", "64", "--reps", "1"],
    "train": ["--seq-len", "16", "--batch", "1", "--steps", "1", "--repeats", "1", "--no-torch",
              "--memory-shards="],
}


def test_default_output_is_a_fresh_folder_not_the_committed_results(tmp_path):
    """Started from a checkout, `bench ring|train|all` without --out leave benchmarks/results/ alone
    and write into a new runs/bench-<time>/ folder of the current directory, which they print."""
    committed = tmp_path / "benchmarks" / "results"
    (committed / "all").mkdir(parents=True)
    for name in ("ring_cpu.json", "ring_cpu.txt", "train_cpu.json", "train_cpu.txt", "all/all.json", "all/all.txt"):
        (committed / name).write_text(f"reference {name}\n")
    before, repo_before = _digest(committed), _digest(ROOT / "benchmarks" / "results")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    seen = set()
    for what, files in (("all", ["all.json", "all.txt"]), ("all", ["all.json", "all.txt"]),
                        ("ring", ["ring_cpu.json", "ring_cpu.txt"]), ("train", ["train_cpu.json", "train_cpu.txt"])):
        p = subprocess.run([sys.executable, "-m", "ringattn", "bench", what] + _CHEAP[what], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        saved = re.findall(r"^saved (\S+?)(?:\.txt|\.json|/all\.json) ", p.stdout, re.M)
        assert len(saved) == 1, p.stdout[-2000:]
        folder = (tmp_path / saved[0]).parent if what != "all" else tmp_path / saved[0]
        assert folder.parent == tmp_path / "runs" and folder.name.startswith("bench-"), folder
        assert folder not in seen  # a second run in the same second gets its own folder too
        seen.add(folder)
        for name in files:
            assert (folder / name).stat().st_size > 0, (what, name)
        json.loads((folder / files[0]).read_text())
    assert _digest(committed) == before
    assert _digest(ROOT / "benchmarks" / "results") == repo_before


def test_fresh_dir_never_reuses_a_name(tmp_path):
    from ringattn.bench import fresh_dir, out_prefix
    a = fresh_dir(str(tmp_path), now=0)
    b = fresh_dir(str(tmp_path), now=0)
    assert a != b and os.path.isdir(a) and os.path.isdir(b) and os.path.basename(a) == "bench-19700101-000000"
    assert out_prefix("x/y", "ring_cpu") == "x/y"


def test_bench_ring_window_cost_follows_the_window(tmp_path):
    """`bench ring --only window` at tiny sizes: rows for every length x layout, with and without the
    window in the same launch, positive times, and the ring steps of ringattn.mask.ring_steps (a window
    shorter than a shard: 2 steps of 4 with the contiguous layout, all 4 without a window)."""
    from ringattn.mask import Mask, ring_steps
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    prefix = tmp_path / "ring"
    p = subprocess.run([sys.executable, "-m", "ringattn", "bench", "ring", "--only", "window", "--window-seqs", "128,192",
                        "--window-left", "8", "--window-heads", "1", "--reps", "1", "--out", str(prefix)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    res = json.loads(prefix.with_suffix(".json").read_text())["window"]
    assert res["ranks"] == 4 and res["window_left"] == 8
    rows = {(r["seq"], r["layout"]): r for r in res["rows"]}
    assert set(rows) == {(s, lay) for s in (128, 192) for lay in ("contiguous", "zigzag", "striped")}
    for (seq, lay), r in rows.items():
        assert r["steps_win"] == ring_steps(Mask(True, 8, 0), seq, 4, lay)
        assert r["steps_full"] == 4
        for key in ("win", "full", "win_cpu", "full_cpu"):
            assert len(r[key]) == 1 and _positive(r[key][0]), (seq, lay, key)
    assert rows[(128, "contiguous")]["steps_win"] == 2
    assert re.search(r"^ +128 contiguous +2/4 ", prefix.with_suffix(".txt").read_text(), re.M)
