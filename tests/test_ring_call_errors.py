"""Ring calls that cannot work give the same clear error on every rank, quickly (issue 11, points 3 and 10).

Ranks in different calls (backward vs forward, unshard vs forward) used to hang; now the agreement
carries the operation. Bad backward arguments on one rank (integer/float64 lse, list dout/out/lse,
string/bool scale) are checked by the same api.check_backward_args as the single-process call.
"""
import re
import time

import pytest

from mpi_util import run_file

DIFFERENT = "ValueError: ringattn.Ring: ranks are in different calls ("
EXPECT = {
    "bwd_vs_fwd": (DIFFERENT, "Ring.attention_backward", "Ring.attention_forward"),
    "unshard_vs_fwd": (DIFFERENT, "Ring.unshard", "Ring.attention_forward"),
    "fwd_vs_unshard": (DIFFERENT, "Ring.unshard", "Ring.attention_forward"),
    "bwd_lse_int": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: lse: dtype int32 but expected float32",),
    "bwd_lse_f64": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: lse: dtype float64 but expected float32",),
    "bwd_dout_list": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: dout: expected an array, got list",),
    "bwd_out_list": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: out: expected an array, got list",),
    "bwd_lse_list": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: lse: expected an array, got list",),
    "fwd_scale_str": ("TypeError: ringattn.Ring.attention_forward: on rank {last}: softmax_scale must be a number",),
    "bwd_scale_bool": ("TypeError: ringattn.Ring.attention_backward: on rank {last}: softmax_scale must be a number",),
}


@pytest.mark.parametrize("P", [2, 3])
def test_ring_call_errors_same_on_every_rank(P):
    t0 = time.time()
    res = run_file(P, "ring_call_errors.py", timeout=60)
    elapsed = time.time() - t0
    lines = [l for l in res.stdout.splitlines() if l.startswith("CASE ")]
    for case, needles in EXPECT.items():
        got = [l for l in lines if l.startswith(f"CASE {case} rank ")]
        assert len(got) == P, (case, res.stdout)
        msgs = {re.sub(r"^CASE \S+ rank \d+: ", "", l) for l in got}
        assert len(msgs) == 1, f"{case}: ranks disagree: {msgs}"  # the SAME error on every rank
        msg = msgs.pop()
        for needle in needles:
            assert needle.format(last=P - 1) in msg, (case, msg)
    assert all(f"AFTER rank {r}: True" in res.stdout for r in range(P)), res.stdout
    assert elapsed < 30, elapsed  # seconds, not a hang
