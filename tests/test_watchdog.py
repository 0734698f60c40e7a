"""ringattn.watchdog: the timeout setting, the cost of a guard, and the abort of a job that waits too long."""
import re
import threading
import time

import pytest

from mpi_util import run_file
from ringattn import watchdog


@pytest.fixture(autouse=True)
def fresh_setting():
    watchdog.set_timeout(None)  # back to the environment (read again)
    yield
    watchdog.set_timeout(None)


def test_timeout_from_environment(monkeypatch):
    monkeypatch.delenv(watchdog.ENV, raising=False)
    assert watchdog.timeout_s() == 600.0
    for text, want in (("2.5", 2.5), ("0", 0.0), ("-1", -1.0), (" 30 ", 30.0), ("", 600.0)):
        monkeypatch.setenv(watchdog.ENV, text)
        watchdog.set_timeout(None)
        assert watchdog.timeout_s() == want, text
    for bad in ("abc", "10s", "nan"):
        monkeypatch.setenv(watchdog.ENV, bad)
        watchdog.set_timeout(None)
        with pytest.raises(ValueError, match=rf"RINGATTN_WATCHDOG_S={bad!r}: expected a number of seconds"):
            watchdog.timeout_s()


def test_set_timeout_overrides_environment(monkeypatch):
    monkeypatch.setenv(watchdog.ENV, "abc")  # never read while overridden
    watchdog.set_timeout(3)
    assert watchdog.timeout_s() == 3.0
    watchdog.set_timeout(0)
    assert watchdog.timeout_s() == 0.0
    for bad in (True, "3", [1]):
        with pytest.raises(TypeError, match="watchdog timeout must be a number of seconds"):
            watchdog.set_timeout(bad)
    with pytest.raises(ValueError, match="not NaN"):
        watchdog.set_timeout(float("nan"))
    assert watchdog.timeout_s() == 0.0  # refused values change nothing


def test_disabled_guard_tracks_nothing():
    watchdog.set_timeout(0)
    with watchdog.guard("Test.off"):
        assert not watchdog._active


def test_guard_is_cheap_and_starts_no_thread_per_call():
    watchdog.set_timeout(600)
    with watchdog.guard("Test.warm"):
        pass
    threads = threading.active_count()
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        with watchdog.guard("Test.cost", i):
            pass
    per_guard_us = (time.perf_counter() - t0) / n * 1e6
    print(f"watchdog.guard enter+exit: {per_guard_us:.2f} us")
    assert threading.active_count() == threads  # one shared watcher thread, nothing per guard
    assert not watchdog._active
    assert per_guard_us < 100  # microseconds (a threading.Timer per guard costs hundreds)


def test_message_names_rank_call_and_step():
    assert watchdog.message(3, 600.2, "Ring.attention_forward", "ring step 2 of 4") == (
        "ringattn watchdog: rank 3 waited 600 s in Ring.attention_forward (ring step 2 of 4); "
        "a peer is stuck or dead; aborting the job")
    assert watchdog.message(0, 2.04, "train.allreduce", 17).startswith(
        "ringattn watchdog: rank 0 waited 2.0 s in train.allreduce (step 17);")


def test_guard_that_waits_too_long_aborts_the_job():
    t0 = time.time()
    res = run_file(2, "watchdog_sleep.py", args=[0.1, 60], timeout=60, check=False,
                   env={watchdog.ENV: "1.0"})
    elapsed = time.time() - t0
    assert res.returncode != 0, res
    assert "SHORT-OK rank 0" in res.stdout and "SHORT-OK rank 1" in res.stdout, res.stdout + res.stderr
    assert "UNREACHABLE" not in res.stdout
    lines = [l for l in res.stderr.splitlines() if l.startswith("ringattn watchdog:")]
    assert len(lines) == 1, res.stderr
    assert re.fullmatch(r"ringattn watchdog: rank 0 waited \d+\.\d s in Test\.sleep \(ring step 2 of 4\); "
                        r"a peer is stuck or dead; aborting the job", lines[0]), lines
    assert elapsed < 30, elapsed  # the body would sleep 60 s
