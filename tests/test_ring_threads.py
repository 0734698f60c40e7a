"""One Ring shared by two threads (issue 11, point 2): calls are serialised by the Ring's lock, so every
result is exact; calls that pair different operations across ranks raise the clear error (no hang)."""
import pytest

from mpi_util import run_file


@pytest.mark.parametrize("P", [2, 3])
def test_two_threads_share_one_ring(P):
    res = run_file(P, "ring_threads.py", args=[25], timeout=120)
    assert f"ALL-OK threads on {P} ranks" in res.stdout, res.stdout + res.stderr
    # 25 calls x 2 threads x 3 phases per rank, every one exact or a clean different-calls error
    for r in range(P):
        assert f"rank {r}: " in res.stdout and "problems: []" in res.stdout, res.stdout
