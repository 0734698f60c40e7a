"""Run a Python script under mpiexec from a pytest test: timeout, process group killed on timeout."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

MPIEXEC = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")


def run_mpi(n, code=None, args=(), timeout=120, module=None, env=None, check=True):
    """Run `code` (a script text) or `module` on n ranks with `python -m mpi4py`.

    Returns the CompletedProcess (stdout and stderr as text). Fails the test on timeout (after
    killing the whole process group) and, when check is true, on a non-zero exit.
    """
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not found (install the mpich wheel)")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py"]
    if module:
        cmd += ["-m", module]
    else:
        cmd += ["-c", textwrap.dedent(code)]
    cmd += [str(a) for a in args]
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    e.update(env or {})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    res = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} exited {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return res
