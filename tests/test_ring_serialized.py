"""MPI initialised at MPI_THREAD_SERIALIZED/FUNNELED (issue 11, point 10): the Ring's progress falls back
to polling between kernel calls on the calling thread ("chunks"), with one note, and stays exact."""
import pytest

from mpi_util import run_file

NOTE = "ringattn: MPI was initialised with MPI_THREAD_{level}, not MULTIPLE: ring progress polls between kernel calls"


@pytest.mark.parametrize("P, level", [(2, "serialized"), (3, "serialized"), (2, "funneled")])
def test_ring_without_thread_multiple_uses_chunks(P, level):
    res = run_file(P, "ring_serialized.py", args=[level], timeout=120)
    assert f"ALL-OK serialized on {P} ranks" in res.stdout, res.stdout + res.stderr
    notes = [l for l in res.stderr.splitlines() if l.startswith("ringattn: MPI was initialised")]
    assert notes == [NOTE.format(level=level.upper()) + " (progress='chunks') instead of from a helper thread"], res.stderr
