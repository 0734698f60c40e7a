"""benchmarks/gpu/run.sh, checked where there is no GPU: the script parses (bash -n, shellcheck when
installed), its plan fits the 7-minute budget, it fails fast and says why without a GPU, and its
summary is what it says; the Ring check it runs (ring_check.py) is run here over the emulated device.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpi_util import run_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
SUMMARY = ROOT / "benchmarks" / "gpu" / "summary.py"
STEPS = ["preflight", "venv", "mpi", "build", "gpu-tests", "memcheck", "racecheck", "ring-2-staged",
         "ring-3-staged", "ring-cuda-aware", "train-2-ranks", "bench"]
SEVEN_MINUTES = 420


def run_script(*args, tmp_path, timeout=20):
    env = dict(os.environ, RINGATTN_GPU_VENV=str(tmp_path / "venv"), RINGATTN_WHEELS=str(tmp_path / "wheels"),
               RINGATTN_GPU_PYTHON=sys.executable)
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT), *args, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=tmp_path)
    return r, time.monotonic() - t0, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_bash_parses_and_shellcheck_is_clean():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr


def test_dry_run_lists_every_step_with_its_timeout_within_the_budget(tmp_path):
    r, secs, summary = run_script("--dry-run", tmp_path=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    plan = [line.split() for line in r.stdout.splitlines() if line.startswith("step ")]
    assert [p[1] for p in plan] == STEPS
    timeouts = [int(p[3]) for p in plan]
    assert all(t > 0 for t in timeouts)
    assert sum(timeouts) <= SEVEN_MINUTES and summary["timeouts_total_s"] == sum(timeouts)
    assert summary["budget_s"] <= SEVEN_MINUTES
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["status"] == "skipped" and s["note"] == "dry run" for s in summary["steps"])
    assert [s["timeout_s"] for s in summary["steps"]] == timeouts
    assert summary["mode"] == "dry-run" and summary["ok"] is False and summary["failed"] == []


def test_without_a_gpu_every_step_fails_fast_and_says_why(tmp_path):
    r, secs, summary = run_script("--assume-no-gpu", tmp_path=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert secs < 20
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS
    assert steps["preflight"]["status"] == "failed" and "no GPU" in steps["preflight"]["note"]
    for name in STEPS[1:]:
        assert steps[name]["status"] == "failed" and steps[name]["note"].startswith("not run: needs "), steps[name]
    assert summary["ok"] is False and summary["failed"] == STEPS and summary["card"] is None
    assert "no GPU" in r.stdout and (tmp_path / "out" / "run.log").read_text().count("## ") == len(STEPS)
    assert not (tmp_path / "venv").exists()  # nothing was installed


def test_bad_argument_is_usage_error(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unknown argument '--frobnicate'" in r.stderr


def test_summary_collects_result_lines_and_pytest_counts(tmp_path):
    (tmp_path / "steps").mkdir()
    rows = [("gpu-tests", "failed", "1", "12", "50", "tests were skipped"), ("bench", "passed", "0", "30", "45", ""),
            ("ring-cuda-aware", "skipped", "77", "1", "25", "not CUDA-aware")]
    (tmp_path / "steps.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (tmp_path / "steps" / "gpu-tests.log").write_text("..s.\nSKIPPED [1] x.py:3: no\n3 passed, 1 skipped in 2.50s\n")
    (tmp_path / "steps" / "bench.log").write_text('table\nRESULT {"a": 1.5}\nRESULT not json\nRESULT {"b": 2}\n')
    r = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path), "--seconds", "43"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 1
    s = json.loads((tmp_path / "summary.json").read_text())
    steps = {x["name"]: x for x in s["steps"]}
    assert steps["gpu-tests"]["numbers"] == {"passed": 3, "skipped": 1}
    assert steps["bench"]["numbers"] == {"a": 1.5, "b": 2} and steps["bench"]["rc"] == 0
    assert steps["ring-cuda-aware"]["status"] == "skipped" and steps["ring-cuda-aware"]["log"] is None
    assert s["failed"] == ["gpu-tests"] and s["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    (tmp_path / "steps.tsv").write_text("\t".join(rows[1]) + "\n")
    r = subprocess.run([sys.executable, str(SUMMARY), str(tmp_path)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and json.loads((tmp_path / "summary.json").read_text())["ok"] is True


@pytest.mark.mpi
def test_ring_check_passes_over_the_emulated_device():
    """The GPU machine's Ring check, run for real (P=2, staged transport) on the emulated device."""
    r = run_file(2, "gpu_ring_check_emulated.py", ["--quick", "--dtypes", "float32,bfloat16", "--layouts", "zigzag",
                                                   "--expect-transport", "staged"],
                 timeout=180, check=False, env={"RINGATTN_CUDA_AWARE_MPI": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "8 cases, 0 failed, transport staged" in r.stdout
    assert '"ring2_failed": 0' in r.stdout


@pytest.mark.mpi
def test_ring_check_fails_when_the_transport_is_not_the_expected_one():
    r = run_file(2, "gpu_ring_check_emulated.py", ["--quick", "--dtypes", "float32", "--layouts", "striped",
                                                   "--expect-transport", "staged"],
                 timeout=180, check=False, env={"RINGATTN_CUDA_AWARE_MPI": "1"})
    assert r.returncode != 0
    assert "FAIL the Ring used the aware transport, expected staged" in r.stdout
