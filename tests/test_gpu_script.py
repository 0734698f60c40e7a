"""benchmarks/gpu/run.sh, checked where there is no GPU: the script parses (bash -n, shellcheck when
installed), its plan fits the 7-minute budget, it fails fast and says why without a GPU, and its
summary is what it says; the Ring check it runs (ring_check.py) is run here over the emulated device;
its mma probe (mma_probe.py) is run with the emulated probe standing in for the GPU's, and the GPU
probe is compiled (not run) with nvcc.
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
STEPS = ["preflight", "mma-probe", "venv", "mpi", "build", "gpu-tests", "memcheck", "racecheck", "ring-2-staged",
         "ring-3-staged", "ring-cuda-aware", "train-2-ranks", "bench"]
SEVEN_MINUTES = 420
PROBE = ROOT / "benchmarks" / "gpu" / "mma_probe.py"


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


# ---- the mma probe step (benchmarks/gpu/mma_probe.py) -------------------------------------------------
def _nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found: the probe step builds with it")
    return nvcc


def run_probe(tmp_path, *args):
    r = subprocess.run([sys.executable, str(PROBE), "--nvcc", _nvcc(), "--workdir", str(tmp_path / "w"), *args],
                       capture_output=True, text=True, timeout=300)
    result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(result) == 1, r.stdout + r.stderr
    return r, json.loads(result[0][len("RESULT "):])


@pytest.fixture(scope="module")
def emulated_probe(tmp_path_factory):
    sys.path.insert(0, str(PROBE.parent))
    import mma_probe

    exe = tmp_path_factory.mktemp("probe") / "emulated"
    mma_probe.build_emulated(_nvcc(), exe)
    return exe


def test_probe_step_passes_when_the_outputs_agree(tmp_path, emulated_probe):
    """The emulated probe as the "GPU" one: the whole step (both builds' runs, compare) agrees."""
    r, res = run_probe(tmp_path, "--probe-exe", str(emulated_probe), "--save", str(tmp_path / "gpu.txt"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert res["probe_ok"] is True and res["probe_mismatches"] == 0
    # every lane of every ldmatrix variant, both mma layouts and both 16 x 8 results were compared
    assert res["probe_lines"] == {"mma-layout": 2 * 32 * 16, "ldsm": 2 * 32 * 2 * 7, "mma": 2 * 128}
    assert (tmp_path / "gpu.txt").read_text().count("\nldsm ") == 2 * 32 * 2 * 7


@pytest.mark.parametrize("line,edit", [
    ("ldsm x4.trans 9 2 1 ", lambda f: f[:-1] + [str(int(f[-1]) ^ 1)]),  # one element in another lane
    ("mma f16 3 5 ", lambda f: f[:-1] + [str(float(f[-1]) + 0.5)]),      # one mma.sync result off
])
def test_probe_step_fails_on_one_wrong_element(tmp_path, emulated_probe, line, edit):
    out = subprocess.run([str(emulated_probe)], capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    i = next(n for n, x in enumerate(out) if x.startswith(line))
    out[i] = " ".join(edit(out[i].split()))
    (tmp_path / "gpu.txt").write_text("\n".join(out) + "\n")
    fake = tmp_path / "fake_gpu_probe"
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'gpu.txt'}\n")
    fake.chmod(0o755)
    r, res = run_probe(tmp_path, "--probe-exe", str(fake))
    assert r.returncode == 3, r.stdout + r.stderr
    assert res["probe_ok"] is False and res["probe_mismatches"] == 2  # the wrong line, and the right one missing
    assert "MISMATCH " + line.split()[0] in r.stdout


def test_probe_step_fails_when_the_probe_fails(tmp_path):
    r, res = run_probe(tmp_path, "--probe-exe", "/bin/false")
    assert r.returncode == 1 and res["probe_ok"] is False and "GPU probe failed" in res["probe_error"]


def test_gpu_probe_compiles_with_nvcc(tmp_path):
    """The step's nvcc build of the real instructions (sm_90, as run.sh), compiled but not run here."""
    sys.path.insert(0, str(PROBE.parent))
    import mma_probe

    mma_probe.build_gpu(_nvcc(), "90", tmp_path / "gpu_probe")
    assert (tmp_path / "gpu_probe").stat().st_size > 0
