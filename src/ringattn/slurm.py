"""Slurm: the `srun --mpi` plugin the example scripts launch with, and a check that the MPI world is
the Slurm step that srun started.

    python -m ringattn.slurm srun-mpi      # prints the value the scripts pass as srun --mpi=...

Plugin: $RINGATTN_SRUN_MPI when set; otherwise the first plugin of a preference list that
`srun --mpi=list` offers. The list follows the MPI library mpi4py loads, because the plugin must
speak that library's process-management protocol: Open MPI talks PMIx (pmix, then pmi2); MPICH and
its derivatives (the mpich wheel, Intel MPI, MVAPICH) talk PMI-2 (pmi2, then pmix; the mpich wheel
aborts under pmix with "unsupported PMI version PMIx"). Slurm lists pmix even where it cannot load
the PMIx library, so "listed" does not mean "works" either.

World check: with the wrong plugin (or --mpi=none) every task srun starts initialises MPI as its
own one-rank world, and N of them then train side by side into one checkpoint directory.
check_world_size(comm) refuses to start when the world has fewer ranks than the step has tasks.
"""
import os
import subprocess
import sys

from .parallel import UsageError

SRUN_MPI_ENV = "RINGATTN_SRUN_MPI"
SKIP_CHECK_ENV = "RINGATTN_SKIP_WORLD_CHECK"


# ---- world size ----------------------------------------------------------------------------

def step_tasks(env):
    """Tasks of the Slurm step that srun started this process in, or None when srun did not.

    srun sets SLURM_STEP_ID for the tasks it starts; a batch script (and a process it starts
    without srun) sees SLURM_NTASKS but no SLURM_STEP_ID.
    """
    if "SLURM_STEP_ID" not in env:
        return None
    n = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    try:
        return int(n)
    except (TypeError, ValueError):
        return None


def world_mismatch(env, world_size):
    """The error message when the MPI world is smaller than the Slurm step, else None.

    Only "smaller" is an error: an mpirun/mpiexec inside a job starts its per-node daemons with
    srun (one task per node), so its ranks legitimately see a step of fewer tasks than ranks.
    """
    if env.get(SKIP_CHECK_ENV, "0") not in ("", "0"):
        return None
    tasks = step_tasks(env)
    if tasks is None or world_size >= tasks:
        return None
    return (f"MPI started {world_size} rank{'s' if world_size != 1 else ''} but this Slurm step has {tasks} tasks: "
            f"srun started {tasks} separate MPI jobs instead of one, most likely because its --mpi plugin does not "
            f"match the MPI library (choose one that `srun --mpi=list` offers with {SRUN_MPI_ENV}, see docs/slurm.md; "
            f"{SKIP_CHECK_ENV}=1 skips this check)")


def check_world_size(comm, env=None):
    """Raise UsageError (on every rank alike: same environment, same size) when comm is smaller
    than the Slurm step."""
    msg = world_mismatch(os.environ if env is None else env, comm.Get_size())
    if msg:
        raise UsageError(msg)


# ---- srun --mpi ----------------------------------------------------------------------------

def parse_mpi_list(text):
    """Plugin names from the output of `srun --mpi=list`: its one-word lines (older versions put
    "srun: " before each line, on stderr)."""
    words = (line.strip().removeprefix("srun:").split() for line in text.splitlines())
    return [w[0] for w in words if len(w) == 1]


def preferred_plugins(library_version):
    return ("pmix", "pmi2") if "Open MPI" in library_version else ("pmi2", "pmix")


def choose_srun_mpi(offered, library_version, override=None):
    """The srun --mpi value: `override` when given, else the library's preferred plugin among `offered`."""
    if override:
        return override
    prefs = preferred_plugins(library_version)
    for name in prefs:
        if name in offered:
            return name
    raise UsageError(f"srun --mpi=list offers {', '.join(offered) or 'nothing'}, none of {', '.join(prefs)} that "
                     f"{library_version.splitlines()[0] if library_version else 'this MPI'} needs; "
                     f"set {SRUN_MPI_ENV} to the plugin your site documents")


def mpi_library_version():
    """MPI_Get_library_version of the library mpi4py loads, without initialising MPI."""
    import mpi4py
    mpi4py.rc.initialize = False
    from mpi4py import MPI
    return MPI.Get_library_version()


def srun_mpi(env=None):
    env = os.environ if env is None else env
    if env.get(SRUN_MPI_ENV):
        return env[SRUN_MPI_ENV]
    try:
        listing = subprocess.run(["srun", "--mpi=list"], capture_output=True, text=True, timeout=60)
    except OSError as e:
        raise UsageError(f"cannot run `srun --mpi=list` ({e}); outside Slurm set RINGATTN_LAUNCH") from None
    if listing.returncode != 0:
        raise UsageError(f"`srun --mpi=list` failed ({listing.returncode}): {listing.stderr.strip()[-500:]}")
    offered = parse_mpi_list(listing.stdout + "\n" + listing.stderr)
    return choose_srun_mpi(offered, mpi_library_version())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["srun-mpi"]:
        sys.stderr.write("usage: python -m ringattn.slurm srun-mpi\n")
        return 2
    try:
        print(srun_mpi())
    except UsageError as e:
        sys.stderr.write(f"ringattn.slurm: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
