"""Failure handling: SIGKILL of one rank ends the job quickly, the last checkpoint is complete and
resuming reproduces the uninterrupted losses; an exception on one rank aborts the job even
without `python -m mpi4py` (mpi_abort.install_excepthook)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mpi_util import MPIEXEC, run_mpi
from ringattn import checkpoint as ckpt

pytestmark = pytest.mark.mpi

STEPS = 400  # the killed run would take a while; it is killed after its first checkpoints
FLAGS = ["--seq-len", "64", "--width", "16", "--layers", "1", "--heads", "2", "--batch", "6",
         "--curriculum", "none", "--steps", str(STEPS), "--warmup", "5", "--lr", "1e-2", "--log-interval", "1",
         "--eval-size", "6", "--target-accuracy", "0", "--no-progress", "--min-shard", "1", "--seed", "5",
         "--check-interval", "0"]


def _losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}


def _popen(cmd, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                            start_new_session=True)


def test_sigkill_one_rank_then_resume(tmp_path):
    d, pids = tmp_path / "ck", tmp_path / "pids"
    pids.mkdir()
    cmd = [MPIEXEC, "-n", "3", sys.executable, "-m", "mpi4py", "-m", "ringattn", "train", *FLAGS,
           "--checkpoint-dir", str(d), "--checkpoint-interval", "4", "--metrics-out", str(tmp_path / "killed.jsonl")]
    proc = _popen(cmd, env={"RINGATTN_PID_DIR": str(pids)})
    try:
        deadline = time.time() + 90
        while not (d.exists() and ckpt.list_checkpoints(str(d))) and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        assert ckpt.list_checkpoints(str(d)), "no checkpoint appeared within 90 s"
        victim = int((pids / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the job did not end within 30 s of SIGKILL on rank 1")
        assert time.time() - t0 < 30
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    left = ckpt.list_checkpoints(str(d))
    assert left  # (a .tmp- file may remain if rank 0 died mid-write: it is never read)
    step, path = left[-1]
    print("killed after checkpoint step", step, "rc", proc.returncode, "in", round(time.time() - t0, 2), "s")
    assert step < STEPS, "the run finished before the kill: make it longer"
    loaded = ckpt.read(path)  # complete and valid
    assert loaded["step"] == step and loaded["state"]["step"] == step
    # Resume on 2 ranks for 6 steps, and compare with an uninterrupted 1-rank run of the same steps.
    run_mpi(2, module="ringattn", args=["train", *FLAGS, "--checkpoint-dir", d, "--resume", "--run-steps", "6",
                                        "--metrics-out", tmp_path / "resumed.jsonl"], timeout=120)
    run_mpi(1, module="ringattn", args=["train", *FLAGS, "--run-steps", str(step + 6),
                                        "--metrics-out", tmp_path / "ref.jsonl"], timeout=120)
    got, ref = _losses(tmp_path / "resumed.jsonl"), _losses(tmp_path / "ref.jsonl")
    assert sorted(got) == list(range(step + 1, step + 7))
    a = np.array([got[s] for s in sorted(got)])
    b = np.array([ref[s] for s in sorted(got)])
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-4, (a, b)


def test_exception_on_one_rank_aborts_without_mpi4py_runner(tmp_path):
    # Launched as `python -c`, not `python -m mpi4py`: without the hook rank 0 would wait forever.
    code = textwrap.dedent("""
        from mpi4py import MPI
        from ringattn import mpi_abort
        mpi_abort.install_excepthook()
        if MPI.COMM_WORLD.Get_rank() == 1:
            raise RuntimeError("boom on rank 1")
        MPI.COMM_WORLD.Barrier()
    """)
    proc = _popen([MPIEXEC, "-n", "2", sys.executable, "-c", code])
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("an exception on rank 1 did not end the job within 30 s")
    assert proc.returncode != 0
    assert "[rank 1] unhandled exception" in err and "boom on rank 1" in err
