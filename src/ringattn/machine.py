"""Facts about the machine and the process, shared by `ringattn info`, the benchmarks and the trainer.

- cpu_model(), physical_cores(), git_commit(): what a results file records about where it ran.
- machine_info(threads, command): the header of every benchmark results file.
- rss_kib(field), reset_peak_rss(), peak_rss_kib(): resident memory from /proc/self/status (Linux).
  A memory measurement is: reset_peak_rss(); before = rss_kib("VmRSS"); work; peak_rss_kib() - before.
- allreduce_sum_small(values, comm, what=None, step=None): a few float statistics summed over a
  communicator on the host.
"""
import os
import platform
import subprocess
import sys
import time


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores():
    """Distinct (package, core) pairs from /proc/cpuinfo; None where that is not available."""
    try:
        pairs, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    pairs.add((phys, line.split(":")[1].strip()))
        return len(pairs) or None
    except OSError:
        return None


def git_commit():
    """Short commit of the checkout this package runs from (+dirty with uncommitted tracked changes);
    None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads, command):
    """Where and how a benchmark ran: CPU, ISA the kernels picked, versions, date, commit, load."""
    import numpy as np
    from .kernels import _cpu  # through kernels: its OpenMP wait setting comes first
    info = {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(),
            "isa": _cpu.active_isa(), "kernel_threads": threads, "threads_per_rank": 1,
            "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_commit": git_commit(),
            "command": command}
    try:
        import mpi4py
        info["mpi4py"] = mpi4py.__version__
    except ImportError:
        pass
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


# ---- resident memory -----------------------------------------------------------------------------

def rss_kib(field="VmRSS"):
    """A KiB field of /proc/self/status (VmRSS: now, VmHWM: peak); -1 where it is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss():
    """Reset the peak (VmHWM) to the current RSS (Linux >= 4.0), so that the next peak_rss_kib() is
    the peak of what follows, not of the process's past. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib():
    """Peak resident memory (KiB) since the process started or since the last reset_peak_rss().
    Without /proc: getrusage's lifetime peak (ru_maxrss is KiB on Linux)."""
    peak = rss_kib("VmHWM")
    if peak >= 0:
        return peak
    import resource
    scale = 1024 if sys.platform == "darwin" else 1  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


# ---- a few statistics over MPI -------------------------------------------------------------------

def allreduce_sum_small(values, comm, what=None, step=None):
    """Sum a small host array (loss sums, counts) over comm; returns a new float64 NumPy array.
    comm None or of size 1: no message. `what`/`step`: guard the collective with the watchdog under
    that name (a hang then names it); None: unguarded."""
    import numpy as np
    buf = np.array(values, dtype=np.float64)  # a copy: the caller's values are left alone
    if comm is None or comm.Get_size() == 1:
        return buf
    from mpi4py import MPI
    if what is None:
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    else:
        from . import watchdog
        with watchdog.guard(what, step):
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return buf
