"""Kernel threads per rank (issue 11, point 12): with OMP_NUM_THREADS unset and no --threads, each
rank takes the cores it may use divided by the ranks sharing them (not every core each), and one
warning line says when the ranks of a node run more threads than it has cores."""
import os
import signal
import subprocess
import sys

import pytest

from mpi_util import MPIEXEC
from ringattn import threads

pytestmark = pytest.mark.mpi

FLAGS = ["--seq-len", "16", "--width", "16", "--layers", "1", "--heads", "2", "--batch", "4", "--curriculum", "none",
         "--steps", "2", "--eval-size", "4", "--target-accuracy", "0", "--no-progress"]
CORES = len(os.sched_getaffinity(0))


def train_without_omp_env(n, *extra):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", "-m", "ringattn", "train",
                             *FLAGS, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("train timed out")
    assert proc.returncode == 0, err[-3000:]
    return err


def test_default_threads_share_the_cores():
    node = set(range(8))
    assert threads.default_threads(node, [node] * 4) == 2
    assert threads.default_threads(node, [node] * 3) == 2
    assert threads.default_threads({0, 1}, [{0, 1}] * 4) == 1  # never 0
    # ranks bound to their own cores keep them all
    assert threads.default_threads({0, 1, 2}, [{0, 1, 2}, {3, 4, 5}]) == 3
    assert threads.oversubscription([{0, 1}] * 4, [1] * 4) == (4, 2)
    assert threads.oversubscription([{0, 1}, {2, 3}], [2, 2]) is None


def test_unset_omp_num_threads_gives_each_rank_its_share():
    err = train_without_omp_env(2)
    want = max(1, CORES // 2)
    assert f"cpu ({want} thread{'' if want == 1 else 's'} per rank)" in err, err[-2000:]
    assert err.count("warning:") == (1 if 2 > CORES else 0), err[-2000:]


def test_oversubscription_warns_once():
    err = train_without_omp_env(2, "--threads", str(CORES))
    lines = [ln for ln in err.splitlines() if "warning:" in ln]
    assert len(lines) == 1, err[-2000:]
    assert f"2 ranks x {CORES} thread" in lines[0] and f"on {CORES} cores" in lines[0]
