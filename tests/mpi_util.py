"""Run MPI programs from tests: `mpiexec -n N python -m mpi4py ...` with a timeout; on timeout the
whole process group (mpiexec and every rank) is killed, so nothing is left behind.

Programs are files under tests/mpi_programs/, runnable by hand:
    mpiexec -n P python -m mpi4py tests/mpi_programs/NAME.py ARGS

- run_file(n, name, args, timeout, env, check): run tests/mpi_programs/NAME (or a path) on n ranks.
- run_mpi(n, module=..., args=...): run `python -m mpi4py -m module` (e.g. the ringattn CLI).
- start(n, name, args, env) / kill_group(proc): a job the test watches itself (e.g. a hang).
Every run gets OMP_NUM_THREADS=1 unless the caller's environment sets it.
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

MPIEXEC = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mpi_programs")


def program(name):
    """The path of a program: NAME under tests/mpi_programs/, or a path as given."""
    return name if os.path.isabs(name) or os.sep in name else os.path.join(PROGRAMS, name)


def _command(n, target, args):
    if not os.path.exists(MPIEXEC):
        pytest.skip("mpiexec not found (install the mpich wheel)")
    return [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *target, *(str(a) for a in args)]


def command(n, name, args=()):
    return _command(n, [program(name)], args)


def environment(env=None):
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    e.update(env or {})
    return e


def _start(cmd, env):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment(env),
                            start_new_session=True)


def start(n, name, args=(), env=None):
    """Popen of the program on n ranks in its own process group (stop it with kill_group)."""
    return _start(command(n, name, args), env)


def kill_group(proc):
    """Continue any stopped rank, then SIGKILL the whole group, so nothing is left behind."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _finish(proc, what, timeout, check):
    """Wait for the job; fail the test on timeout (group killed) or, with check, on a non-zero exit."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"{what} timed out after {timeout}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    if check and proc.returncode != 0:
        pytest.fail(f"{what} exited {proc.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_file(n, name, args=(), timeout=120, env=None, check=True):
    """Run a program file on n ranks; returns the CompletedProcess (stdout, stderr as text)."""
    return _finish(start(n, name, args, env), f"mpiexec -n {n} {name}", timeout, check)


def run_mpi(n, module, args=(), timeout=120, env=None, check=True):
    """Run `python -m mpi4py -m module` on n ranks; as run_file."""
    return _finish(_start(_command(n, ["-m", module], args), env), f"mpiexec -n {n} -m {module}", timeout, check)
