"""ringattn.slurm without a Slurm: the world-size check's logic and its wiring into `train`, and the
choice of the srun --mpi plugin (test_train_slurm.py runs both under a real one)."""
import os
import subprocess
import sys

import pytest

from mpi_util import run_mpi
from ringattn import slurm
from ringattn.parallel import UsageError

# what Slurm 22.05 prints for `srun --mpi=list` on Debian (pmix listed though libpmix is absent)
LIST_22_05 = """MPI plugin types are...
\tpmix
\tnone
\tcray_shasta
\tpmi2
specific pmix plugin versions available: pmix_v4
"""
# older versions: one line per plugin, on stderr, behind "srun: "
LIST_OLD = "srun: MPI types are...\nsrun: none\nsrun: pmi2\nsrun: openmpi\n"
MPICH = "MPICH Version:      5.0.2\nMPICH Release date: ...\n"
OPENMPI = "Open MPI v4.1.6, package: Open MPI ...\n"
STEP = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}
BATCH = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}  # a batch script's environment: no step id


class FakeComm:
    def __init__(self, size):
        self.size = size

    def Get_size(self):
        return self.size


def test_step_tasks_only_inside_an_srun_step():
    assert slurm.step_tasks({}) is None
    assert slurm.step_tasks(BATCH) is None
    assert slurm.step_tasks(STEP) == 4
    assert slurm.step_tasks({"SLURM_STEP_ID": "3", "SLURM_NTASKS": "6"}) == 6  # older srun: no STEP_NUM_TASKS
    assert slurm.step_tasks({"SLURM_STEP_ID": "3", "SLURM_STEP_NUM_TASKS": "x"}) is None


@pytest.mark.parametrize("world", [1, 2, 3])
def test_smaller_world_than_step_is_refused(world):
    msg = slurm.world_mismatch(STEP, world)
    assert msg and f"MPI started {world} rank" in msg and "this Slurm step has 4 tasks" in msg
    assert "--mpi plugin" in msg and slurm.SRUN_MPI_ENV in msg and slurm.SKIP_CHECK_ENV in msg
    with pytest.raises(UsageError, match="this Slurm step has 4 tasks"):
        slurm.check_world_size(FakeComm(world), env=STEP)


def test_matching_or_larger_world_and_no_step_pass():
    assert slurm.world_mismatch(STEP, 4) is None
    # mpiexec inside a job: its per-node daemon is one srun task, its ranks are many
    assert slurm.world_mismatch(dict(STEP, SLURM_STEP_NUM_TASKS="1"), 8) is None
    assert slurm.world_mismatch(BATCH, 1) is None  # a process the batch script started without srun
    assert slurm.world_mismatch({}, 1) is None
    slurm.check_world_size(FakeComm(4), env=STEP)


def test_skip_variable():
    assert slurm.world_mismatch(dict(STEP, RINGATTN_SKIP_WORLD_CHECK="1"), 1) is None
    assert slurm.world_mismatch(dict(STEP, RINGATTN_SKIP_WORLD_CHECK="0"), 1) is not None


def test_parse_mpi_list():
    assert slurm.parse_mpi_list(LIST_22_05) == ["pmix", "none", "cray_shasta", "pmi2"]
    assert slurm.parse_mpi_list(LIST_OLD) == ["none", "pmi2", "openmpi"]
    assert slurm.parse_mpi_list("") == []


def test_choose_srun_mpi_follows_the_mpi_library():
    offered = slurm.parse_mpi_list(LIST_22_05)
    assert slurm.choose_srun_mpi(offered, MPICH) == "pmi2"  # the mpich wheel aborts under pmix
    assert slurm.choose_srun_mpi(offered, OPENMPI) == "pmix"
    assert slurm.choose_srun_mpi(["none", "pmi2"], OPENMPI) == "pmi2"
    assert slurm.choose_srun_mpi(["none", "pmix"], MPICH) == "pmix"
    assert slurm.choose_srun_mpi(offered, MPICH, override="pmix_v4") == "pmix_v4"
    with pytest.raises(UsageError, match=r"offers none, cray_shasta.*RINGATTN_SRUN_MPI"):
        slurm.choose_srun_mpi(["none", "cray_shasta"], MPICH)


def _srun_mpi(env):
    return subprocess.run([sys.executable, "-m", "ringattn.slurm", "srun-mpi"], capture_output=True, text=True,
                          env=env, timeout=60)


def test_srun_mpi_command_override_and_no_srun():
    res = _srun_mpi(dict(os.environ, RINGATTN_SRUN_MPI="pmix", PATH="/nonexistent"))
    assert res.returncode == 0 and res.stdout == "pmix\n", res.stderr
    env = {k: v for k, v in os.environ.items() if k != "RINGATTN_SRUN_MPI"}
    res = _srun_mpi(dict(env, PATH="/nonexistent"))
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "srun --mpi=list" in res.stderr and "RINGATTN_LAUNCH" in res.stderr


TRAIN = ["train", "--seq-len", "16", "--batch", "2", "--width", "8", "--heads", "2", "--layers", "1", "--steps", "1",
         "--curriculum", "none", "--eval-size", "2", "--target-accuracy", "0", "--min-shard", "1", "--no-progress"]


@pytest.mark.mpi
def test_train_refuses_a_world_smaller_than_its_step(tmp_path):
    # as if srun had started this rank as one of 2 tasks of a step, with a plugin MPI did not understand
    step = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "RINGATTN_SKIP_WORLD_CHECK": "0"}
    args = TRAIN + ["--checkpoint-dir", tmp_path / "ck"]
    res = run_mpi(1, module="ringattn", args=args, env=step, check=False, timeout=60)
    assert res.returncode == 2, res.stderr[-2000:]
    # (mpi4py's runner adds an MPI_Abort line for the non-zero exit)
    assert res.stderr.splitlines()[0] == "ringattn train: error: " + slurm.world_mismatch(step, 1), res.stderr[-2000:]
    assert not (tmp_path / "ck").exists()
    res = run_mpi(1, module="ringattn", args=args, env=dict(step, RINGATTN_SKIP_WORLD_CHECK="1"), timeout=60)
    assert "step 1" in res.stdout + res.stderr


def test_test_slurm_skips_with_one_line_where_not_installed(monkeypatch):
    import slurm_cluster
    monkeypatch.setattr(slurm_cluster, "SEARCH", "/nonexistent")
    reason = slurm_cluster.skip_reason()
    assert reason.startswith("Slurm not installed (munged, slurmctld, slurmd, sbatch") and "\n" not in reason


def test_test_slurm_conf_keeps_everything_in_its_folder():
    import slurm_cluster
    text = slurm_cluster.slurm_conf("/T", "h", 3, "/T/munge.socket", 1234, 1235)
    paths = [v for k, v in (l.split("=", 1) for l in text.splitlines() if "=" in l) if v.startswith("/")]
    assert len(paths) >= 7 and all(p.startswith("/T/") for p in paths), paths
    for line in ("ProctrackType=proctrack/linuxproc", "SelectType=select/cons_tres", "SlurmUser=root",
                 "AuthInfo=socket=/T/munge.socket", "SlurmctldPort=1234", "SlurmdPort=1235"):
        assert line in text.splitlines()
    assert "NodeName=h NodeAddr=127.0.0.1 CPUs=3 " in text and "OverSubscribe=FORCE" in text
