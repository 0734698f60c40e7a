"""The flat gradient buffer reduced over real ranks (tests/mpi_programs/flat_reducer.py: host, and the
emulated device staged and CUDA-aware), and a checkpoint written before the flat buffers
(tests/data/pre_flat, by the per-array code) resuming with the same next losses."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpi_util import run_file, run_mpi

pytestmark = pytest.mark.mpi

PRE_FLAT = Path(__file__).parent / "data" / "pre_flat"


@pytest.mark.parametrize("n", [1, 3])
def test_flat_reducer_over_ranks(n):
    res = run_file(n, "flat_reducer.py", timeout=120)
    for mode in ("host", "staged", "aware"):
        assert f"flat reducer ok: {mode} on {n} ranks" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("n", [1, 2])
def test_pre_flat_checkpoint_resumes_with_the_same_losses(tmp_path, n):
    """The file holds name -> array dicts (params, m, v): the flat layout reads it back, and steps
    9..20 equal those of the uninterrupted run of the code that wrote it."""
    saved = json.loads((PRE_FLAT / "expected.json").read_text())
    d = tmp_path / "ck"
    d.mkdir()
    shutil.copy(PRE_FLAT / "ckpt-00000008.ra", d)
    out = tmp_path / "m.jsonl"
    # --decay-steps 0: the schedule that code's defaults gave (needle's default decay came later)
    run_mpi(n, module="ringattn", args=["train", *saved["flags"], "--decay-steps", "0", "--checkpoint-dir", d,
                                        "--resume", "--metrics-out", out], timeout=120)
    rows = [json.loads(line) for line in open(out)]
    got = {r["step"]: r for r in rows if "loss" in r and not r.get("final")}
    assert sorted(got) == list(range(9, 21))
    for key, tol in (("loss", 1e-5), ("grad_norm", 1e-5)):
        want = np.array([saved[key][str(s)] for s in range(9, 21)])
        have = np.array([got[s][key] for s in range(9, 21)])
        assert np.abs(have - want).max() <= tol * np.abs(want).max(), (key, have, want)
    assert np.ptp([saved["loss"][str(s)] for s in range(9, 21)]) > 1e-2  # the curve moves
