"""A stopped rank does not hang the training job: the others' watchdog (--watchdog SECONDS) aborts
it with one line naming the rank, the collective and the step."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mpi_util import MPIEXEC

pytestmark = pytest.mark.mpi

# sp 1 x dp 2 (64 tokens < --min-shard 256): rank 0 waits for rank 1 in the gradient allreduce
FLAGS = ["--seq-len", "64", "--width", "16", "--layers", "1", "--heads", "2", "--batch", "4", "--curriculum", "none",
         "--steps", "100000", "--log-interval", "1", "--eval-size", "4", "--target-accuracy", "0", "--no-progress",
         "--check-interval", "0"]


def test_sigstop_of_one_rank_ends_the_job_through_the_watchdog(tmp_path):
    pids, metrics = tmp_path / "pids", tmp_path / "m.jsonl"
    pids.mkdir()
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "ringattn", "train", *FLAGS,
           "--watchdog", "3", "--metrics-out", str(metrics)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RINGATTN_PID_DIR=str(pids))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    victim = None
    try:
        deadline = time.time() + 60
        while not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "training did not start within 60 s"
            time.sleep(0.05)
        victim = int((pids / "rank1.pid").read_text())
        os.kill(victim, signal.SIGSTOP)
        t0 = time.time()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still hangs 30 s after SIGSTOP of rank 1 (--watchdog 3)")
        waited = time.time() - t0
    finally:
        if victim is not None:
            try:
                os.kill(victim, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        try:  # nothing of the job may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"job ended {waited:.1f} s after SIGSTOP, rc {proc.returncode}")
    assert proc.returncode != 0
    assert waited < 20  # (rank 0 may have entered the allreduce, and its 3 s, before the SIGSTOP)
    lines = [ln for ln in err.splitlines() if ln.startswith("ringattn watchdog:")]
    assert len(lines) == 1, err[-3000:]
    m = re.match(r"ringattn watchdog: rank 0 waited ([0-9.]+) s in gradient allreduce \(step \d+\)", lines[0])
    assert m and float(m.group(1)) >= 3, lines[0]
