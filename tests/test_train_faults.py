"""`ringattn train` under faults and first-contact mistakes (issue 11): another run's checkpoints
are never destroyed, a diverged run stops with an error before saving its state, the checkpoint
directory is checked before the first step, --time-limit is per invocation, crafted checkpoints and
bad flags give one clean line, and a small run does what its flags say."""
import json
import os
import types

import numpy as np
import pytest

from mpi_util import run_mpi
from ringattn import checkpoint as ckpt
from ringattn import train as T

pytestmark = pytest.mark.mpi

TINY = ["--seq-len", "37", "--width", "16", "--layers", "1", "--heads", "2", "--batch", "4", "--curriculum", "none",
        "--steps", "30", "--log-interval", "1", "--eval-size", "8", "--target-accuracy", "0", "--no-progress",
        "--min-shard", "1", "--seed", "4"]


def train(tmp_path, *extra, n=2, name="m", check=False):
    out = tmp_path / f"{name}.jsonl"
    res = run_mpi(n, module="ringattn", args=["train", *TINY, "--metrics-out", out, *extra], timeout=120, check=check)
    return res, out


def strict_rows(path):
    """Metrics lines parsed as strict JSON (NaN/Infinity are not JSON)."""
    def refuse(name):
        raise ValueError(f"non-JSON constant {name} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in open(path)]


def one_error(res, kind, text):
    assert res.returncode == (3 if kind == "diverged" else 2), (res.returncode, res.stderr[-2000:])
    assert res.stderr.count(f"ringattn train: {kind}:") == 1, res.stderr[-2000:]
    assert text in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


# ---- point 5: another run's checkpoints ------------------------------------------------------------

def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    d = tmp_path / "ck"
    res, _ = train(tmp_path, "--checkpoint-dir", d, "--run-steps", "3", check=True)
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    assert list(before) == [ckpt.filename(3)]
    res, out = train(tmp_path, "--checkpoint-dir", d, "--steps", "40", name="b")
    one_error(res, "error", "already holds 1 checkpoint(s) (newest ckpt-00000003.ra): pass --resume")
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before  # untouched
    assert not out.exists() or not any("loss" in r for r in strict_rows(out))  # not one step ran
    res, _ = train(tmp_path, "--checkpoint-dir", d, "--resume", "--overwrite", name="c")
    one_error(res, "error", "--resume and --overwrite exclude each other")
    # --overwrite: deletes them, as asked, and starts afresh
    res, out = train(tmp_path, "--checkpoint-dir", d, "--overwrite", "--run-steps", "2", name="d", check=True)
    assert "--overwrite: deleted 1 checkpoint(s)" in res.stderr
    assert sorted(os.listdir(d)) == [ckpt.filename(2)]


def test_pruning_touches_only_the_runs_own_checkpoints(tmp_path):
    arrays = {"w": np.arange(3.0)}
    for step in (10, 20):
        ckpt.save(str(tmp_path), step, {}, arrays, {}, {}, {}, keep=1, run_id="other")
    for step in (30, 40, 50):
        ckpt.save(str(tmp_path), step, {}, arrays, {}, {}, {}, keep=2, run_id="mine")
    assert sorted(os.listdir(tmp_path)) == [ckpt.filename(s) for s in (20, 40, 50)]
    assert ckpt.read(str(tmp_path / ckpt.filename(20)))["run_id"] == "other"


def test_resumed_run_keeps_pruning_its_own_files(tmp_path):
    d = tmp_path / "ck"
    train(tmp_path, "--checkpoint-dir", d, "--checkpoint-interval", "2", "--run-steps", "4", check=True)
    rid = ckpt.read(str(d / ckpt.filename(4)))["run_id"]
    assert rid and len(rid) == 32
    train(tmp_path, "--checkpoint-dir", d, "--checkpoint-interval", "2", "--run-steps", "4", "--resume",
          name="r", check=True)
    assert sorted(os.listdir(d)) == [ckpt.filename(6), ckpt.filename(8)]
    assert ckpt.read(str(d / ckpt.filename(8)))["run_id"] == rid


# ---- point 6: divergence -------------------------------------------------------------------------

def test_diverged_run_stops_before_saving_and_metrics_stay_json(tmp_path):
    d = tmp_path / "ck"
    res, out = train(tmp_path, "--lr", "1e6", "--checkpoint-dir", d, "--checkpoint-interval", "1")
    one_error(res, "diverged", "not finite; the run diverged")
    rows = strict_rows(out)
    assert rows[-1]["final"] and rows[-1]["stop"] == "diverged" and rows[-1]["step"] < 30
    for _, path in ckpt.list_checkpoints(str(d)):  # whatever was saved is finite
        assert all(np.isfinite(a).all() for a in ckpt.read(path)["params"].values())
    assert len(ckpt.list_checkpoints(str(d))) >= 1  # the good state before the blow-up stays


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--init-std", "nan"), ("--lr", "inf"),
                                         ("--clip", "-inf"), ("--advance-accuracy", "nan")])
def test_nan_and_inf_flags_are_refused(tmp_path, flag, value):
    res, _ = train(tmp_path, f"{flag}={value}")
    one_error(res, "error", f"{flag} must be a finite number")


# ---- point 7: the checkpoint directory -----------------------------------------------------------

def test_unwritable_checkpoint_directory_is_found_before_the_first_step(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, so nothing can be created below it (also as root)")
    res, out = train(tmp_path, "--checkpoint-dir", blocker / "ck", "--checkpoint-interval", "1000")
    one_error(res, "error", f"checkpoint directory {blocker / 'ck'} is not writable")
    assert not out.exists() or not any("loss" in r for r in strict_rows(out))


def test_stale_temporaries_are_removed_on_start_and_resume(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / ".tmp-killed1.ra").write_bytes(b"half a checkpoint")
    res, _ = train(tmp_path, "--checkpoint-dir", d, "--run-steps", "2", check=True)
    assert sorted(os.listdir(d)) == [ckpt.filename(2)] and "removed 1 temporary file(s)" in res.stderr
    (d / ".tmp-killed2.ra").write_bytes(b"half a checkpoint")
    train(tmp_path, "--checkpoint-dir", d, "--run-steps", "2", "--resume", name="r", check=True)
    assert sorted(os.listdir(d)) == [ckpt.filename(2), ckpt.filename(4)]


# ---- points 8 and 14: time limits ----------------------------------------------------------------

def test_time_limit_is_per_invocation(tmp_path):
    d = tmp_path / "ck"
    train(tmp_path, "--checkpoint-dir", d, "--run-steps", "5", check=True)
    # The checkpoint claims 10^6 s of earlier training: a resumed run still gets its own 60 s.
    path = str(d / ckpt.filename(5))
    c = ckpt.read(path)
    c["state"]["train_time"] = 1e6
    os.unlink(path)
    ckpt.save(str(d), 5, c["config"], c["params"], c["optim"], c["rng"], c["state"], run_id=c["run_id"])
    res, out = train(tmp_path, "--checkpoint-dir", d, "--resume", "--run-steps", "10", "--time-limit", "60",
                     name="r", check=True)
    final = strict_rows(out)[-1]
    assert final["stop"] == "steps" and final["step"] == 15, final
    assert "60 s of this run" in res.stderr


def test_no_time_limit_by_default():
    import argparse
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    args = p.parse_args([])
    assert args.time_limit == 0


# ---- point 10: crafted checkpoints, negative flags, head dim --------------------------------------

@pytest.mark.parametrize("change, text", [
    (lambda c: c["state"].pop("window"), "malformed training state (KeyError: 'window')"),
    (lambda c: c["state"].update(stage=7), "malformed training state (step 3, stage 7 of a 1-stage plan)"),
    (lambda c: c["state"].update(window=5), "malformed training state (TypeError"),
])
def test_crafted_checkpoint_with_valid_checksum_is_one_clean_line(tmp_path, change, text):
    d = tmp_path / "ck"
    train(tmp_path, "--checkpoint-dir", d, "--run-steps", "3", check=True)
    path = str(d / ckpt.filename(3))
    c = ckpt.read(path)
    change(c)
    blob = ckpt.encode(3, c["config"], c["params"], c["optim"], c["rng"], c["state"], run_id=c["run_id"])
    ckpt.write_atomic(path, blob)
    res, _ = train(tmp_path, "--checkpoint-dir", d, "--resume", name="r")
    one_error(res, "checkpoint error", text)


def test_crafted_header_and_payload_are_checkpoint_errors():
    good = ckpt.encode(3, {}, {"w": np.zeros(2)}, {}, {}, {"step": 3})
    nl = good.index(b"\n", len(ckpt.MAGIC))
    payload = good[nl + 1:]
    for header, msg in (([1, 2], "not a JSON object"), ({"step": "3"}, "step must be an integer")):
        if isinstance(header, dict):
            header = dict(json.loads(good[len(ckpt.MAGIC):nl]), **header)
        blob = ckpt.MAGIC + json.dumps(header).encode() + b"\n" + payload
        with pytest.raises(ckpt.CheckpointError, match=msg):
            ckpt.decode(blob)
    import hashlib
    import io
    buf = io.BytesIO()
    np.savez(buf, **{"weird/w": np.zeros(2), "state": np.frombuffer(b"{}", np.uint8)})
    p = buf.getvalue()
    h = dict(json.loads(good[len(ckpt.MAGIC):nl]), payload_bytes=len(p), payload_sha256=hashlib.sha256(p).hexdigest())
    with pytest.raises(ckpt.CheckpointError, match="unexpected array 'weird/w'"):
        ckpt.decode(ckpt.MAGIC + json.dumps(h).encode() + b"\n" + p)


@pytest.mark.parametrize("extra, msg", [
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--init-std", "-1"], "--init-std must be >= 0"),
    (["--time-limit", "-5"], "--time-limit must be >= 0"),
    (["--advance-accuracy", "1.5"], "--advance-accuracy must be in [0, 1]"),
    (["--watchdog", "-1"], "--watchdog must be >= 0"),
    (["--width", "1024", "--heads", "2"], "head dim --width/--heads = 512 exceeds the attention kernels' limit of 256"),
])
def test_out_of_range_flags_are_refused(tmp_path, extra, msg):
    res, _ = train(tmp_path, *extra)
    one_error(res, "error", msg)


# ---- point 13: a small run does what it was asked ------------------------------------------------

def test_small_run_reaches_its_length_and_says_why_no_ring(tmp_path):
    out = tmp_path / "small.jsonl"
    res = run_mpi(2, module="ringattn", timeout=120,
                  args=["train", "--seq-len", "64", "--steps", "20", "--batch", "8", "--width", "16", "--layers", "1",
                        "--log-interval", "1", "--eval-size", "8", "--no-progress", "--metrics-out", out])
    rows = [r for r in strict_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert max(r["batch"] for r in rows) <= 8  # the explicit --batch bounds every stage
    assert rows[-1]["seq_len"] == 64 and sum(r["seq_len"] == 64 for r in rows) >= 10
    assert "warm-up 2," in res.stderr
    assert ("sp 1 at length 64 (the ring is not used): a ring of 2 would leave each rank < --min-shard 256 "
            "tokens; pass --min-shard 32 to force the ring") in res.stderr


def args_for(*argv):
    import argparse
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    return p.parse_args(list(argv))


def test_plan_helpers():
    assert T.stage_ends([(12, 1024), (32, 512), (128, 128), (512, 32), (2048, 16)], 3000) == [
        (12, 1024, 375), (32, 512, 750), (128, 128, 1125), (512, 32, 1500), (2048, 16, None)]
    assert T.stage_ends([(12, 64), (32, 32), (64, 8)], 20) == [(12, 64, 5), (32, 32, 10), (64, 8, None)]
    assert T.stage_ends([(12, 64), (32, 32), (64, 8)], 2) == [(32, 32, 1), (64, 8, None)]  # no step for 12
    assert T.stage_ends([(64, 8)], 20) == [(64, 8, None)]
    # the default plan of the main job is unchanged
    sp, plan = T.validate(args_for(), 4)
    assert [(ln, b, s) for ln, b, s, _ in plan] == [(12, 1024, 1), (32, 512, 1), (128, 128, 1), (512, 32, 2),
                                                    (2048, 16, 4)]
    a = args_for()
    T.validate(a, 4)
    assert (a.batch, a.warmup, a.time_limit) == (16, 100, 0)
    # explicit --batch caps the default curriculum; explicit --curriculum keeps its batches
    _, plan = T.validate(args_for("--batch", "8", "--seq-len", "64", "--steps", "20"), 2)
    assert [(ln, b) for ln, b, _, _ in plan] == [(12, 8), (32, 8), (64, 8)]
    a = args_for("--batch", "8", "--seq-len", "64", "--curriculum", "12:32")
    _, plan = T.validate(a, 2)
    assert [(ln, b) for ln, b, _, _ in plan] == [(12, 32), (64, 8)]
    T.validate(a, 2)  # validating twice (the cap is decided once) gives the same plan
    assert [(ln, b) for ln, b, _, _ in T.validate(a, 2)[1]] == [(12, 32), (64, 8)]
    a = args_for("--steps", "20")
    T.validate(a, 1)
    assert a.warmup == 2
    a = args_for("--steps", "20", "--warmup", "7")
    T.validate(a, 1)
    assert a.warmup == 7
    assert T.ring_note([(64, 16, 2, None)], 2, 2, 256) is None
    assert "pass --min-shard 16" in T.ring_note([(64, 16, 1, None)], 4, 4, 256)


def test_stage_budget_moves_a_stuck_stage_on():
    t = types.SimpleNamespace(plan=[(12, 8, 1, 5), (64, 8, 1, None)], stage=0, window=[], step=4,
                              args=types.SimpleNamespace(advance_accuracy=0.9))
    rec = {"correct": 0, "count": 8, "batch": 8}
    assert T.Trainer.advance(t, rec) == (0.0, False) and t.stage == 0
    t.step = 5
    assert T.Trainer.advance(t, rec)[1] and t.stage == 1
    t.step = 50
    assert not T.Trainer.advance(t, rec)[1] and t.stage == 1  # the final stage never ends
