"""examples/slurm: the sbatch scripts parse and their #SBATCH lines are well formed; their command
lines run locally under mpiexec (RINGATTN_LAUNCH replaces srun, no Slurm variables set); and, where
Slurm is installed, they run for real under `sbatch --wait` on a one-node test Slurm
(slurm_cluster.py): training on 2 tasks, its resubmission resuming, the benchmarks at small sizes,
a job whose tasks are not one MPI world failing clearly, and mpiexec inside a job passing that check."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from mpi_util import MPIEXEC
from slurm_cluster import slurm  # noqa: F401  (the session fixture)

pytestmark = pytest.mark.mpi

HERE = os.path.dirname(os.path.abspath(__file__))
SLURM = os.path.join(HERE, "..", "examples", "slurm")
SCRIPTS = sorted(f for f in os.listdir(SLURM) if f.endswith(".sbatch"))
VENV = os.path.dirname(os.path.dirname(sys.executable))  # the venv running the tests
# `#SBATCH --long-option[=value]` or `#SBATCH -x value`
SBATCH = re.compile(r"^#SBATCH (--[a-z][a-z-]*(=\S+)?|-[a-zA-Z] \S+)$")
SMALL = ["--seq-len", "24", "--batch", "4", "--width", "16", "--heads", "2", "--layers", "1", "--curriculum", "none",
         "--eval-size", "4", "--target-accuracy", "0", "--log-interval", "1", "--min-shard", "1"]
TINY = SMALL + ["--steps", "3"]
# a 6-step run done in two invocations of the same command (as a requeued job runs it)
IN_TWO = SMALL + ["--steps", "6", "--run-steps", "3"]
JOB_TIMEOUT = 120  # seconds for one sbatch --wait


@pytest.mark.parametrize("name", ["train.sbatch", "train_gpu.sbatch", "bench.sbatch"])
def test_script_flags_are_flags_of_the_commands_it_runs(name):
    """Every --flag the script hands to ringattn is one the ringattn subcommands it runs accept
    (a renamed or removed flag fails here, not hours into a queued job)."""
    lines = [l.split("#")[0] for l in open(os.path.join(SLURM, name)).read().splitlines()
             if not l.startswith("#") and "srun" not in l]
    subs = sorted(set(re.findall(r"python -m ringattn ((?:bench )?[a-z]+)", "\n".join(lines))))
    assert subs, "the script runs no ringattn command"
    helps = "".join(subprocess.run([sys.executable, "-m", "ringattn", *sub.split(), "--help"], capture_output=True,
                                   text=True, timeout=60, check=True).stdout for sub in subs)
    flags = {f for l in lines for f in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", l)} - {"--"}
    assert flags and not {f for f in flags if not re.search(re.escape(f) + r"\b", helps)}, (subs, flags)


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
    assert "OMP_NUM_THREADS" in text and "OMP_PLACES" in text
    # the srun --mpi plugin is chosen by ringattn.slurm (one place), never written into a script
    assert 'srun --mpi=$(python -m ringattn.slurm srun-mpi)' in text and "--mpi=pmix" not in text


def _clean_env(**extra):
    """This environment without any Slurm variable (a test may itself run inside a Slurm job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(RINGATTN_VENV=VENV, OMP_NUM_THREADS="1", **extra)
    return env


def _run_script(name, tmp_path, extra):
    # the documented local try: RINGATTN_LAUNCH and nothing else (no SLURM_JOB_NAME, no RINGATTN_CKPT)
    return subprocess.run(["bash", os.path.join(SLURM, name), *extra], cwd=tmp_path, text=True, capture_output=True,
                          env=_clean_env(RINGATTN_LAUNCH=f"{MPIEXEC} -n 2"), timeout=120)


def _final(path):
    rows = [json.loads(l) for l in open(path)]
    return rows[-1]


def test_train_script_runs_locally_and_resumes(tmp_path):
    res = _run_script("train.sbatch", tmp_path, IN_TWO)
    assert res.returncode == 0, res.stderr[-3000:]
    row = _final(tmp_path / "metrics-local.jsonl")
    assert row["final"] and row["step"] == 3
    assert glob.glob(str(tmp_path / "checkpoints" / "ringattn-train" / "ckpt-*.ra"))
    # the same command again finds the checkpoint and continues from it
    res = _run_script("train.sbatch", tmp_path, IN_TWO)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr and "at step 3" in res.stderr
    assert _final(tmp_path / "metrics-local.jsonl")["step"] == 6


@pytest.mark.parametrize("name", ["train.sbatch", "train_gpu.sbatch"])
def test_local_launch_does_not_pin_threads(name, tmp_path):
    # OMP_PROC_BIND=close pins a rank's threads from the first core of its CPU mask: with mpiexec's
    # unbound ranks (all masks the whole machine) every rank would land on core 0.
    show = tmp_path / "show-env"
    show.write_text('#!/bin/sh\necho "bind=${OMP_PROC_BIND-unset} places=${OMP_PLACES-unset} threads=$OMP_NUM_THREADS"\n')
    show.chmod(0o755)
    env = _clean_env(RINGATTN_LAUNCH=str(show))
    env.pop("OMP_PROC_BIND", None), env.pop("OMP_PLACES", None)
    res = subprocess.run(["bash", os.path.join(SLURM, name)], cwd=tmp_path, text=True, capture_output=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "bind=unset places=unset threads=1", res.stdout


def test_gpu_script_command_runs_on_cpu(tmp_path):
    res = _run_script("train_gpu.sbatch", tmp_path, TINY + ["--device", "cpu"])  # the last --device wins
    assert res.returncode == 0, res.stderr[-3000:]
    assert _final(tmp_path / "metrics-local.jsonl")["step"] == 3
    assert glob.glob(str(tmp_path / "checkpoints" / "ringattn-train-gpu" / "ckpt-*.ra"))


# ---- under a real (one-node, throw-away) Slurm -------------------------------------------------

def _sbatch(cluster, tmp_path, script, extra=(), env=None, job_name=None):
    """Submit examples/slurm/SCRIPT on 2 tasks of one core each and wait; (returncode, job output)."""
    opts = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path}/job-%j.out"]
    if cluster.cpus < 2:
        opts.append("--overcommit")
    if job_name:
        opts.append(f"--job-name={job_name}")
    before = set(glob.glob(f"{tmp_path}/job-*.out"))
    res = cluster.sbatch([*opts, os.path.join(SLURM, script), *extra], cwd=tmp_path, timeout=JOB_TIMEOUT,
                         env=dict(RINGATTN_VENV=VENV, **(env or {})))
    out = [p for p in glob.glob(f"{tmp_path}/job-*.out") if p not in before]
    text = open(out[0]).read() if out else ""
    assert "Submitted batch job" in res.stdout, res.stderr + text
    return res.returncode, text


def test_srun_mpi_choice_suits_the_mpich_wheel(slurm):
    # this Slurm lists pmix but cannot load it, and the wheel speaks PMI-2 anyway
    res = subprocess.run([sys.executable, "-m", "ringattn.slurm", "srun-mpi"], env=slurm.env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "pmi2", res.stderr


def test_sbatch_train_runs_then_resumes(slurm, tmp_path):
    rc, out = _sbatch(slurm, tmp_path, "train.sbatch", IN_TWO)
    assert rc == 0, out[-3000:]
    assert "2 ranks" in out and "resumed from" not in out, out[-3000:]
    if slurm.cpus >= 2:  # srun --cpu-bind=cores gave each rank its own core
        assert "compete for cores" not in out, out[-3000:]
    job1 = glob.glob(str(tmp_path / "metrics-*.jsonl"))
    assert len(job1) == 1 and _final(job1[0])["step"] == 3
    ckpts = glob.glob(str(tmp_path / "checkpoints" / "ringattn-train" / "ckpt-*.ra"))
    assert ckpts, os.listdir(tmp_path)
    # the requeued / resubmitted job continues where the first stopped
    rc, out = _sbatch(slurm, tmp_path, "train.sbatch", IN_TWO)
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "at step 3" in out, out[-3000:]
    job2 = [p for p in glob.glob(str(tmp_path / "metrics-*.jsonl")) if p not in job1]
    assert len(job2) == 1 and _final(job2[0])["step"] == 6


def test_sbatch_world_size_mismatch_fails_clearly(slurm, tmp_path):
    # srun --mpi=none: each of the 2 tasks initialises MPI as its own 1-rank world
    rc, out = _sbatch(slurm, tmp_path, "train.sbatch", TINY, env={"RINGATTN_SRUN_MPI": "none"}, job_name="mismatch")
    assert rc != 0
    msg = "MPI started 1 rank but this Slurm step has 2 tasks"
    assert out.count(msg) == 2, out[-3000:]  # every task says it
    assert "--mpi plugin" in out and "RINGATTN_SRUN_MPI" in out
    assert not glob.glob(str(tmp_path / "checkpoints" / "mismatch" / "*")), "a one-rank run started"
    assert not glob.glob(str(tmp_path / "metrics-*.jsonl"))


def test_sbatch_mpiexec_inside_the_job_passes_the_check(slurm, tmp_path):
    # mpiexec starts its per-node proxy as a 1-task srun step: 2 ranks in a 1-task step are one world
    rc, out = _sbatch(slurm, tmp_path, "train.sbatch", TINY, env={"RINGATTN_LAUNCH": f"{MPIEXEC} -n 2"})
    assert rc == 0 and "2 ranks" in out, out[-3000:]


def test_sbatch_bench_small(slurm, tmp_path):
    rc, out = _sbatch(slurm, tmp_path, "bench.sbatch", env={"RINGATTN_BENCH_SIZE": "small"})
    assert rc == 0, out[-3000:]
    (res_dir,) = glob.glob(str(tmp_path / "ringattn-bench-*"))
    train = json.load(open(os.path.join(res_dir, "train_cpu.json")))
    ring = json.load(open(os.path.join(res_dir, "ring_cpu.json")))
    assert "2 ranks" in out, out[-3000:]
    assert train and {"overlap", "balance", "memory"} <= set(ring), (list(train), list(ring))
