"""Training checkpoints: one file per save, written atomically by one rank, validated before use.

File layout (`ckpt-<step>.ra`):

    b"RINGATTN-CKPT\\n"                     magic
    <one JSON line>\\n                      header: format, step, run id, config, payload size and sha256
    <payload>                              an uncompressed .npz: "param/<name>", "optim/<name>",
                                           "rng/<name>" arrays and "state" (JSON of scalars)

Writing: a temporary file in the same directory, flush + fsync, os.replace onto the final name,
fsync of the directory; so a crash (or SIGKILL) at any moment leaves either the previous complete
checkpoints or the new complete one, never a partial file under a checkpoint name. After a save
the oldest files of the same run (the run id in the header) are removed so that its newest `keep`
remain (default 2: the newest and one before it); another run's files are never touched.
`prepare_directory` runs before training: it creates the directory, proves it writable, refuses a
fresh run over another run's checkpoints, and removes temporaries left by a killed writer.

Loading checks, in order, before anything is returned: magic, header, payload size (truncation),
sha256 (corruption), format version, the header's and payload's structure, and that the saved config matches the run's (the flags
that change the model or the data); the caller then checks names/shapes against its live
parameters before copying anything in (`check_compatible`).
"""
import glob
import hashlib
import io
import json
import os
import re
import tempfile
import uuid

import numpy as np

MAGIC = b"RINGATTN-CKPT\n"
FORMAT = 1
PATTERN = re.compile(r"^ckpt-(\d{8})\.ra$")
TMP_PREFIX = ".tmp-"
SECTIONS = {"param": "params", "optim": "optim", "rng": "rng"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or from another config."""


def filename(step):
    return f"ckpt-{step:08d}.ra"


def list_checkpoints(directory):
    """(step, path) of every checkpoint-named file in `directory`, oldest first."""
    out = []
    for p in glob.glob(os.path.join(directory, "ckpt-*.ra")):
        m = PATTERN.match(os.path.basename(p))
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest(directory):
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


# ---- encode / decode (pure, in memory) --------------------------------------------------------

def new_run_id():
    return uuid.uuid4().hex


def encode(step, config, params, optim, rng, state, run_id=None):
    """Bytes of one checkpoint. params/optim/rng: dict name -> array; state: JSON-able dict."""
    arrays = {}
    for prefix, d in (("param", params), ("optim", optim), ("rng", rng)):
        for name, a in d.items():
            arrays[f"{prefix}/{name}"] = np.asarray(a)
    arrays["state"] = np.frombuffer(json.dumps(state, sort_keys=True, allow_nan=False).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    payload = buf.getvalue()
    header = {"format": FORMAT, "step": int(step), "run_id": run_id, "config": config,
              "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest()}
    return MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + payload


def decode(blob, where="checkpoint", config=None, absent=None):
    """Validate and unpack bytes from `encode`. Raises CheckpointError naming the problem.

    Returns dict(step, run_id, config, params, optim, rng, state). With `config`, every key of it and
    of the saved config must have the same value in both (a checkpoint from a different model or
    task is refused); `absent` gives the value a key missing from either stands for (keys added
    after older checkpoints were written: {"decay_steps": 0} reads an older file as "no decay").
    """
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{where}: not a ringattn checkpoint (bad magic bytes; empty or foreign file)")
    nl = blob.find(b"\n", len(MAGIC))
    if nl < 0:
        raise CheckpointError(f"{where}: truncated inside the header")
    header = _parse_header(blob[len(MAGIC):nl], where)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{where}: checkpoint format {header.get('format')!r}, this version reads {FORMAT}")
    payload = blob[nl + 1:]
    want = header.get("payload_bytes")
    if len(payload) != want:
        raise CheckpointError(f"{where}: truncated or padded: payload has {len(payload)} bytes, header says {want}")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise CheckpointError(f"{where}: corrupted: sha256 of the payload does not match the header")
    # The checksum only proves the payload is what the writer wrote: a crafted (or future) file
    # can still be the wrong shape, so every field used below is checked first.
    saved = header.get("config") or {}
    if not isinstance(header.get("step"), int) or not isinstance(saved, dict) \
            or not isinstance(header.get("run_id"), (str, type(None))):
        raise CheckpointError(f"{where}: malformed header (step must be an integer, config an object, "
                              f"run_id a string)")
    if config is not None:
        absent = absent or {}
        both = {k: (saved.get(k, absent.get(k)), config.get(k, absent.get(k))) for k in sorted({*saved, *config})}
        diff = [f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in both.items() if a != b]
        if diff:
            raise CheckpointError(f"{where}: written by a different configuration; "
                                  f"differences: {'; '.join(diff)}")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = json.loads(arrays.pop("state").tobytes().decode())
    except Exception as e:  # checksum matched: a writer bug or a crafted file; still say so clearly
        raise CheckpointError(f"{where}: payload unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: malformed payload: the training state is not a JSON object")
    out = {"step": header["step"], "run_id": header.get("run_id"), "config": saved,
           "params": {}, "optim": {}, "rng": {}, "state": state}
    for key, a in arrays.items():
        prefix, _, name = key.partition("/")
        if prefix not in SECTIONS or not name:
            raise CheckpointError(f"{where}: malformed payload: unexpected array {key!r}")
        out[SECTIONS[prefix]][name] = a
    return out


def _parse_header(line, where):
    try:
        header = json.loads(line)
    except ValueError as e:
        raise CheckpointError(f"{where}: corrupted header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: malformed header (not a JSON object)")
    return header


def read_header(path):
    """The header of a checkpoint file (dict), or None if it is not one; reads only the first line."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                return None
            return _parse_header(f.readline(1 << 20).rstrip(b"\n"), path)
    except (OSError, CheckpointError):
        return None


def check_compatible(loaded, live, what, where="checkpoint"):
    """Every live array has a saved one of the same shape and dtype, and nothing extra."""
    missing = sorted(set(live) - set(loaded))
    extra = sorted(set(loaded) - set(live))
    if missing or extra:
        raise CheckpointError(f"{where}: {what} names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, a in live.items():
        b = loaded[name]
        shape = tuple(a.shape) if hasattr(a, "shape") else np.shape(a)  # NumPy or CuPy
        dtype = np.dtype(a.dtype) if hasattr(a, "dtype") else np.asarray(a).dtype
        if b.shape != shape or b.dtype != dtype:
            raise CheckpointError(f"{where}: {what} {name!r} is {b.dtype}{b.shape}, the run has {dtype}{shape}")


# ---- files ------------------------------------------------------------------------------------

def write_atomic(path, blob):
    """Write bytes so that `path` is either absent/old or complete: tmp + fsync + replace + dir fsync."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".ra", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def save(directory, step, config, params, optim, rng, state, keep=2, run_id=None):
    """Write checkpoint `step`, then prune run `run_id`'s files to its newest `keep` (keep <= 0:
    keep all); files of other runs stay. Returns the path."""
    path = os.path.join(directory, filename(step))
    write_atomic(path, encode(step, config, params, optim, rng, state, run_id=run_id))
    if keep > 0:
        ours = [p for _, p in list_checkpoints(directory) if (read_header(p) or {}).get("run_id", 0) == run_id]
        for old in ours[:-keep]:
            try:
                os.unlink(old)
            except OSError:
                pass
    return path


def read(path, config=None, absent=None):
    """Load and validate one checkpoint file (see decode)."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    return decode(blob, where=path, config=config, absent=absent)


def prepare_directory(directory, fresh, overwrite=False):
    """Make `directory` ready for a run, before its first step. Returns a list of notes.

    Creates it and writes (then removes) a probe file, so an unwritable directory is found now and
    not at the first save. A fresh run (not resuming) refuses a directory holding checkpoints unless
    `overwrite`, which deletes them: otherwise `--resume` would later pick another run's files, or
    this run would overwrite them. Temporaries of an interrupted write (never a checkpoint) are
    removed. Raises CheckpointError naming the problem.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX + "probe-", dir=directory)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"checkpoint directory {directory} is not writable: {e.strerror or e}") from None
    notes = []
    found = list_checkpoints(directory)
    if fresh and found:
        if not overwrite:
            raise CheckpointError(
                f"checkpoint directory {directory} already holds {len(found)} checkpoint(s) (newest "
                f"{os.path.basename(found[-1][1])}): pass --resume to continue that run, --overwrite to delete "
                f"them and start afresh, or another --checkpoint-dir")
        for _, p in found:
            os.unlink(p)
        notes.append(f"--overwrite: deleted {len(found)} checkpoint(s) in {directory}")
    stale = [n for n in os.listdir(directory) if n.startswith(TMP_PREFIX)]
    for n in stale:
        try:
            os.unlink(os.path.join(directory, n))
        except OSError:
            pass
    if stale:
        notes.append(f"removed {len(stale)} temporary file(s) of an interrupted write in {directory}")
    return notes
