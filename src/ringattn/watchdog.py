"""Watchdog: abort the whole MPI job when a blocking call waits too long.

A rank whose peer is stopped, dead or stuck in another call would otherwise wait forever inside an MPI
call. Code that may block wraps that call in `guard(what, step)`; if the body has not finished after
`timeout_s()` seconds, one line naming the rank, the call and the step goes to stderr and the job is
aborted with `comm.Abort(1)`, so the scheduler sees a failed job instead of a silent hang.

The timeout comes from the environment variable RINGATTN_WATCHDOG_S (seconds, default 600; zero or a
negative value disables the watchdog) unless `set_timeout` overrides it in this process.

One daemon thread, started on first use, watches every open guard; entering and leaving a guard only
touches a dict under a lock, so guarding each ring step costs microseconds.
"""
import itertools
import math
import os
import sys
import threading
import time

ENV = "RINGATTN_WATCHDOG_S"
DEFAULT_S = 600.0

_override = None          # set by set_timeout; None means "read the environment"
_from_env = None          # the environment's value, once read
_lock = threading.Lock()
_active = {}              # guard id -> (start, what, step, comm)
_ids = itertools.count()
_wake = threading.Event()  # set when the timeout changes so the watcher re-reads it
_thread = None


def _parse(text):
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: expected a number of seconds (0 or negative disables "
                         f"the watchdog)") from None
    if math.isnan(value):
        raise ValueError(f"{ENV}={text!r}: expected a number of seconds, not NaN")
    return value


def timeout_s():
    """Seconds a guarded call may block before the job is aborted; <= 0 means never.

    The environment is read once, at first use (set_timeout(None) makes the next call read it again),
    because every guard asks and reading os.environ costs more than the rest of a guard.
    """
    global _from_env
    if _override is not None:
        return _override
    if _from_env is None:
        text = os.environ.get(ENV)
        _from_env = DEFAULT_S if text is None or text.strip() == "" else _parse(text)
    return _from_env


def set_timeout(seconds):
    """Override the timeout in this process (seconds; <= 0 disables; None goes back to the environment)."""
    global _override, _from_env
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"watchdog timeout must be a number of seconds, got {type(seconds).__name__}")
        if math.isnan(seconds):
            raise ValueError("watchdog timeout must be a number of seconds, not NaN")
        seconds = float(seconds)
    _override, _from_env = seconds, None
    _wake.set()


def _describe_step(step):
    if step is None:
        return ""
    if isinstance(step, int):
        return f" (step {step})"
    return f" ({step})"


def _world_rank():
    try:
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    except Exception:  # no MPI at all: the message still names the call
        pass
    return "?"


def message(rank, waited, what, step=None):
    """The one line the watchdog prints before aborting."""
    shown = f"{waited:.0f}" if waited >= 10 else f"{waited:.1f}"
    return (f"ringattn watchdog: rank {rank} waited {shown} s in {what}{_describe_step(step)}; "
            f"a peer is stuck or dead; aborting the job")


def _abort(waited, what, step, comm):
    try:
        sys.stderr.write(message(_world_rank(), waited, what, step) + "\n")
        sys.stderr.flush()
    except Exception:
        pass
    # Backstop: if Abort itself cannot end the process (MPI wedged), exit anyway.
    backstop = threading.Timer(10.0, os._exit, (1,))
    backstop.daemon = True
    backstop.start()
    try:
        if comm is None:
            from mpi4py import MPI
            comm = MPI.COMM_WORLD
        comm.Abort(1)
    except Exception:
        pass
    os._exit(1)


def _watch():
    while True:
        limit = _safe_timeout()
        now = time.monotonic()
        expired = None
        with _lock:
            if limit > 0:
                for start, what, step, comm in _active.values():
                    if now - start >= limit and (expired is None or start < expired[0]):
                        expired = (start, what, step, comm)
        if expired is not None:
            start, what, step, comm = expired
            _abort(now - start, what, step, comm)
            return
        # Poll at a tenth of the timeout (bounded) so an abort comes soon after the deadline.
        interval = 1.0 if limit <= 0 else min(1.0, max(0.02, limit / 10))
        _wake.wait(interval)
        _wake.clear()


def _safe_timeout():
    try:
        return timeout_s()
    except ValueError:  # reported to the caller by guard(); the watcher must not die
        return 0.0


def _ensure_thread():
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_watch, name="ringattn-watchdog", daemon=True)
            _thread.start()


class guard:
    """Context manager: abort the job if the body blocks longer than timeout_s().

    what: the call, e.g. "Ring.attention_forward"; step: an int (printed "step N") or a phrase such as
    "ring step 2 of 4"; comm: the communicator to abort (MPI.COMM_WORLD when None). Guards may nest;
    the oldest guard past its deadline fires.
    """
    __slots__ = ("what", "step", "comm", "_id")

    def __init__(self, what, step=None, comm=None):
        self.what, self.step, self.comm, self._id = what, step, comm, None

    def __enter__(self):
        if timeout_s() > 0:
            if _thread is None:
                _ensure_thread()
            self._id = next(_ids)
            entry = (time.monotonic(), self.what, self.step, self.comm)
            with _lock:
                _active[self._id] = entry
        return self

    def __exit__(self, *exc):
        if self._id is not None:
            with _lock:
                _active.pop(self._id, None)
            self._id = None
        return False
