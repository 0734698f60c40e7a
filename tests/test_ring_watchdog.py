"""A stuck peer (SIGSTOP) no longer hangs the ring forever (issue 11, point 11): the waiting ranks'
watchdog prints which rank waited in which call and step, and aborts the job."""
import os
import re
import signal
import subprocess
import time

import pytest

from mpi_util import kill_group, start

TIMEOUT_S = 2.0


def wait_for(paths, proc, limit):
    t0 = time.time()
    while not all(os.path.exists(p) for p in paths):
        if proc.poll() is not None or time.time() - t0 > limit:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("P, call, stopped, what", [(3, "forward", 1, "Ring.attention_forward"),
                                                    (2, "backward", 0, "Ring.attention_backward"),
                                                    (2, "unshard", 1, "Ring.unshard")])
def test_stopped_rank_trips_the_watchdog(tmp_path, P, call, stopped, what):
    proc = start(P, "ring_stuck_peer.py", args=[tmp_path, call], env={"RINGATTN_WATCHDOG_S": str(TIMEOUT_S)})
    try:
        ready = wait_for([tmp_path / f"rank{r}.{kind}" for r in range(P) for kind in ("pid", "ready")], proc, 60)
        assert ready, proc.communicate(timeout=5) if proc.poll() is not None else "ranks never got ready"
        os.kill(int((tmp_path / f"rank{stopped}.pid").read_text()), signal.SIGSTOP)
        t0 = time.time()
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"job still running {TIMEOUT_S + 20:.0f} s after rank {stopped} was stopped")
        elapsed = time.time() - t0
    finally:
        kill_group(proc)
        proc.wait()
    assert proc.returncode != 0
    lines = [l for l in err.splitlines() if l.startswith("ringattn watchdog:")]
    assert lines, err
    waiting = sorted(set(range(P)) - {stopped})
    pattern = (rf"ringattn watchdog: rank ({'|'.join(map(str, waiting))}) waited \d+\.\d s in {re.escape(what)} "
               rf"\((ring step \d of {P}|final gradient hop|argument agreement|Allgatherv)\); "
               rf"a peer is stuck or dead; aborting the job")
    assert all(re.fullmatch(pattern, l) for l in lines), lines
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 15, elapsed  # a guard may have opened just before the stop
    print(f"{what} at P={P}: job ended {elapsed:.1f} s after rank {stopped} was stopped: {lines[0]}")
