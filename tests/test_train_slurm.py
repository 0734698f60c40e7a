"""examples/slurm: the sbatch scripts parse, their #SBATCH lines are well formed, and their own
command lines run locally under mpiexec (RINGATTN_LAUNCH replaces srun, tiny extra flags)."""
import json
import os
import re
import subprocess
import sys

import pytest

from mpi_util import MPIEXEC

pytestmark = pytest.mark.mpi

HERE = os.path.dirname(os.path.abspath(__file__))
SLURM = os.path.join(HERE, "..", "examples", "slurm")
SCRIPTS = sorted(f for f in os.listdir(SLURM) if f.endswith(".sbatch"))
# `#SBATCH --long-option[=value]` or `#SBATCH -x value`
SBATCH = re.compile(r"^#SBATCH (--[a-z][a-z-]*(=\S+)?|-[a-zA-Z] \S+)$")
TINY = ["--seq-len", "24", "--batch", "4", "--width", "16", "--heads", "2", "--layers", "1", "--steps", "3",
        "--curriculum", "none", "--eval-size", "4", "--target-accuracy", "0", "--log-interval", "1",
        "--min-shard", "1"]


def test_there_are_cpu_gpu_and_bench_scripts():
    assert {"train.sbatch", "train_gpu.sbatch", "bench.sbatch"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    path = os.path.join(SLURM, name)
    subprocess.run(["bash", "-n", path], check=True)
    lines = open(path).read().splitlines()
    assert lines[0] == "#!/bin/bash"
    sb = [l for l in lines if l.startswith("#SBATCH")]
    assert sb, "no #SBATCH lines"
    bad = [l for l in sb if not SBATCH.match(l)]
    assert not bad, bad
    # all #SBATCH lines come before the first command (sbatch stops reading them there)
    first_cmd = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert all(lines.index(l) < first_cmd for l in sb)
    opts = " ".join(sb)
    for key in ("--nodes", "--ntasks-per-node", "--cpus-per-task", "--time"):
        assert key in opts
    text = "\n".join(lines)
    assert "OMP_NUM_THREADS" in text and "OMP_PLACES" in text and "srun --mpi=pmix" in text


def _run_script(name, tmp_path, extra):
    env = dict(os.environ, RINGATTN_LAUNCH=f"{MPIEXEC} -n 2", RINGATTN_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               RINGATTN_CKPT=str(tmp_path / "ck"), SLURM_JOB_NAME="t", SLURM_JOB_ID="42", SLURM_CPUS_PER_TASK="1")
    return subprocess.run(["bash", os.path.join(SLURM, name), *extra], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)


def test_train_script_runs_locally_and_resumes(tmp_path):
    res = _run_script("train.sbatch", tmp_path, TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics-42.jsonl")]
    assert rows[-1]["final"] and rows[-1]["step"] == 3
    assert os.listdir(tmp_path / "ck")
    # a resubmission finds the checkpoint and continues from it
    res = _run_script("train.sbatch", tmp_path, TINY)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr


def test_gpu_script_command_runs_on_cpu(tmp_path):
    res = _run_script("train_gpu.sbatch", tmp_path, TINY + ["--device", "cpu"])  # the last --device wins
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(l) for l in open(tmp_path / "metrics-42.jsonl")]
    assert rows[-1]["final"] and rows[-1]["step"] == 3
