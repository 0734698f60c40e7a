"""Run a program file from tests/mpi_programs under mpiexec (python -m mpi4py), for tests.

mpi_util.run_mpi takes script text; these helpers take a real file, so the program can also be run by
hand: `mpiexec -n P python -m mpi4py tests/mpi_programs/NAME.py ARGS`.
"""
import os
import signal
import subprocess
import sys

import pytest

from mpi_util import MPIEXEC

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_programs")


def command(n, name, args=()):
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not found (install the mpich wheel)")
    return [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", os.path.join(PROGRAMS, name)] + [str(a) for a in args]


def environment(env=None):
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    e.update(env or {})
    return e


def start(n, name, args=(), env=None):
    """Popen of the job in its own process group (stop it with kill_group)."""
    return subprocess.Popen(command(n, name, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(env), start_new_session=True)


def kill_group(proc):
    """Continue any stopped rank, then SIGKILL the whole group, so nothing is left behind."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def run_file(n, name, args=(), timeout=120, env=None, check=True):
    """Run the program on n ranks; fail the test on timeout (group killed) or, with check, on non-zero exit."""
    proc = start(n, name, args, env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {n} {name} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} {name} exited {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return res
