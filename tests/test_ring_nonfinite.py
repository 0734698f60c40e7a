"""A NaN or Inf in q, k or v reaches every ring output that sees it, at P = 1..4, every layout,
causal and not, forward and backward: runs tests/mpi_programs/ring_nonfinite.py under mpiexec."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mpi_util import MPIEXEC

PROGRAM = Path(__file__).resolve().parent / "mpi_programs" / "ring_nonfinite.py"


def run_script(n, script, args=(), timeout=180):
    """mpi_util.run_mpi for a program file (run_mpi takes code text; the program finds its helpers
    through its own path): timeout, process group killed on timeout."""
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not found (install the mpich wheel)")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.mpi
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_keeps_bad_values(P):
    res = run_script(P, PROGRAM)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), f"{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.count("\nok P=") + res.stdout.startswith("ok P=") == 3 * 2 * 3  # every case ran
