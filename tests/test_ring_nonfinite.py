"""A NaN or Inf in q, k or v reaches every ring output that sees it, at P = 1..4, every layout,
causal and not, forward and backward: runs tests/mpi_programs/ring_nonfinite.py under mpiexec."""
from pathlib import Path

import pytest

from mpi_util import run_file

PROGRAM = Path(__file__).resolve().parent / "mpi_programs" / "ring_nonfinite.py"


@pytest.mark.mpi
@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_ring_keeps_bad_values(P):
    res = run_file(P, str(PROGRAM), timeout=180, check=False)
    assert res.returncode == 0 and res.stdout.rstrip().endswith("ok"), f"{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    assert res.stdout.count("\nok P=") + res.stdout.startswith("ok P=") == 3 * 2 * 3  # every case ran
