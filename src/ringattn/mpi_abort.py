"""An uncaught exception on one rank ends the whole MPI job (also without `python -m mpi4py`)."""
import sys
import traceback


def install_excepthook(comm=None):
    """Make an uncaught exception on any rank end the whole job (MPI_Abort), also without `-m mpi4py`.

    Without this, the other ranks would wait forever in their next collective.
    """
    from mpi4py import MPI
    comm = comm or MPI.COMM_WORLD
    previous = sys.excepthook

    def hook(kind, value, tb):
        rank = comm.Get_rank()
        text = "".join(traceback.format_exception(kind, value, tb))
        sys.stderr.write(f"[rank {rank}] unhandled exception, aborting the MPI job:\n{text}")
        sys.stderr.flush()
        try:
            comm.Abort(1)
        finally:  # pragma: no cover - Abort does not return
            previous(kind, value, tb)

    sys.excepthook = hook
    return previous
