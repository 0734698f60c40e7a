"""Checkpoint files: round trip, atomic writes, pruning, and clear errors for bad files."""
import os

import numpy as np
import pytest

from ringattn import checkpoint as ckpt


def _state(seed):
    rng = np.random.default_rng(seed)
    params = {"a.w": rng.standard_normal((7, 3)).astype(np.float32), "a.b": rng.standard_normal(3)}
    optim = {"step": np.array(5), "m/a.w": rng.standard_normal((7, 3)).astype(np.float32)}
    rng_state = {"data": rng.integers(0, 2**31, size=4)}
    state = {"step": 5, "stage": 2, "window": [[3, 4], [4, 4]]}
    return params, optim, rng_state, state


CONFIG = {"task": "needle", "width": 16, "seed": 1}


def test_round_trip_exact(tmp_path):
    params, optim, rng_state, state = _state(0)
    path = ckpt.save(str(tmp_path), 5, CONFIG, params, optim, rng_state, state)
    got = ckpt.read(path, config=CONFIG)
    assert got["step"] == 5 and got["state"] == state and got["config"] == CONFIG
    for src, dst in ((params, got["params"]), (optim, got["optim"]), (rng_state, got["rng"])):
        assert set(src) == set(dst)
        for k in src:
            assert dst[k].dtype == np.asarray(src[k]).dtype
            np.testing.assert_array_equal(dst[k], src[k])


def test_atomic_write_leaves_no_temporary_and_prunes(tmp_path):
    params, optim, rng_state, state = _state(1)
    for step in (10, 20, 30, 40):
        ckpt.save(str(tmp_path), step, CONFIG, params, optim, rng_state, state, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == [ckpt.filename(30), ckpt.filename(40)]
    assert ckpt.latest(str(tmp_path)).endswith(ckpt.filename(40))


def test_truncated_file_is_refused(tmp_path):
    params, optim, rng_state, state = _state(2)
    path = ckpt.save(str(tmp_path), 1, CONFIG, params, optim, rng_state, state)
    blob = open(path, "rb").read()
    for cut in (0, 5, len(ckpt.MAGIC) + 3, len(blob) // 2, len(blob) - 1):
        with open(path, "wb") as f:
            f.write(blob[:cut])
        with pytest.raises(ckpt.CheckpointError, match="truncated|not a ringattn checkpoint|corrupted header"):
            ckpt.read(path)


def test_corrupted_byte_is_refused(tmp_path):
    params, optim, rng_state, state = _state(3)
    path = ckpt.save(str(tmp_path), 1, CONFIG, params, optim, rng_state, state)
    blob = bytearray(open(path, "rb").read())
    blob[-100] ^= 0x40  # inside the payload (array bytes)
    with open(path, "wb") as f:
        f.write(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match="corrupted: sha256"):
        ckpt.read(path)


def test_other_config_is_refused_and_named(tmp_path):
    params, optim, rng_state, state = _state(4)
    path = ckpt.save(str(tmp_path), 1, CONFIG, params, optim, rng_state, state)
    with pytest.raises(ckpt.CheckpointError, match=r"different configuration.*width: checkpoint 16 vs run 32"):
        ckpt.read(path, config=dict(CONFIG, width=32))


def test_a_key_only_one_side_has_is_compared_too(tmp_path):
    """A key the run lacks (or the file lacks) is compared with its `absent` value, not skipped: a
    checkpoint of a decayed run must not resume silently into a run without the decay."""
    params, optim, rng_state, state = _state(5)
    path = ckpt.save(str(tmp_path), 1, dict(CONFIG, decay_steps=300), params, optim, rng_state, state)
    with pytest.raises(ckpt.CheckpointError, match=r"decay_steps: checkpoint 300 vs run None"):
        ckpt.read(path, config=CONFIG)
    with pytest.raises(ckpt.CheckpointError, match=r"decay_steps: checkpoint 300 vs run 0"):
        ckpt.read(path, config=CONFIG, absent={"decay_steps": 0})
    assert ckpt.read(path, config=dict(CONFIG, decay_steps=300))["step"] == 1
    old = ckpt.save(str(tmp_path / "old"), 1, CONFIG, params, optim, rng_state, state)  # written before the key
    assert ckpt.read(old, config=dict(CONFIG, decay_steps=0), absent={"decay_steps": 0})["step"] == 1
    with pytest.raises(ckpt.CheckpointError, match=r"decay_steps: checkpoint 0 vs run 400"):
        ckpt.read(old, config=dict(CONFIG, decay_steps=400), absent={"decay_steps": 0})


def test_compatibility_check_names_the_array():
    live = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(3)}
    ckpt.check_compatible({"a": np.zeros((2, 3), np.float32), "b": np.zeros(3)}, live, "parameter")
    with pytest.raises(ckpt.CheckpointError, match=r"parameter 'a' is float32\(3, 2\)"):
        ckpt.check_compatible({"a": np.zeros((3, 2), np.float32), "b": np.zeros(3)}, live, "parameter")
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['b'\]"):
        ckpt.check_compatible({"a": np.zeros((2, 3), np.float32)}, live, "parameter")


def test_missing_file_and_foreign_file(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.read(str(tmp_path / "nope.ra"))
    p = tmp_path / "ckpt-00000001.ra"
    np.savez(p.open("wb"), x=np.zeros(3))
    with pytest.raises(ckpt.CheckpointError, match="bad magic"):
        ckpt.read(str(p))
