"""The trainer's checkpoints (checkpoint.py holds the file format): the directory check before
step 1, saving (world rank 0 writes, everyone waits), resuming (rank 0 reads and validates,
then broadcasts), and the typed training state inside a checkpoint."""
from .. import checkpoint as ckpt
from .. import gradients
from . import flags
from .errors import Diverged
from ..parallel import UsageError


def training_state(st, n_stages, where):
    """The trainer's scalars from a checkpoint's state, typed; CheckpointError if any is missing or
    malformed (a checksum only proves the writer wrote it, not that it is a state of this trainer)."""
    try:
        out = {"step": int(st["step"]), "stage": int(st["stage"]), "tokens_seen": int(st["tokens_seen"]),
               "train_time": float(st["train_time"]),
               "window": [(int(c), int(n)) for c, n in st["window"]],
               "decay_start": None if st.get("decay_start") is None else int(st["decay_start"])}
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{where}: malformed training state ({type(e).__name__}: {e})") from None
    if out["step"] < 0 or not 0 <= out["stage"] < n_stages:
        raise ckpt.CheckpointError(f"{where}: malformed training state (step {out['step']}, stage {out['stage']} "
                                   f"of a {n_stages}-stage plan)")
    return out


class Checkpoints:
    """Trainer methods that save and restore its state (mixed into Trainer)."""

    def _prepare_checkpoint_dir(self):
        """Rank 0 checks the directory (writable; not another run's unless --resume/--overwrite)
        before any step; every rank gets the same verdict. Returns (notes, run id of a fresh run)."""
        a = self.args
        result = ("ok", [], ckpt.new_run_id())
        if self.rank == 0 and a.checkpoint_dir:
            try:
                result = ("ok", ckpt.prepare_directory(a.checkpoint_dir, fresh=not a.resume, overwrite=a.overwrite),
                          result[2])
            except ckpt.CheckpointError as e:
                result = ("error", str(e), None)
        with self.guard("checkpoint directory check (bcast)"):
            status, notes, run_id = self.world.bcast(result, root=0)
        if status == "error":
            raise UsageError(notes)
        return notes, run_id

    def save(self):
        a = self.args
        if not a.checkpoint_dir:
            return None
        self.check_finite()
        path = None
        if self.rank == 0:
            state = {"step": self.step, "stage": self.stage, "window": self.window,
                     "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                     "world_size": self.size, "opt_step": self.opt.step, "decay_start": self.hp.decay_start}
            host = gradients.to_host
            optim = {k: host(v) for k, v in self.optim.flatten_state(self.opt.state()).items()}
            path = ckpt.save(a.checkpoint_dir, self.step, flags.run_config(a), {k: host(v) for k, v in self.params.items()},
                             optim, {}, state, keep=a.keep_checkpoints, run_id=self.run_id)
        with self.guard("checkpoint barrier"):
            self.world.Barrier()  # nobody runs ahead of a checkpoint that may be needed for a restart
        return path

    def check_finite(self):
        """Refuse to save or report non-finite parameters (identical on every rank, so no collective)."""
        xp = self.xp
        if all(bool(xp.isfinite(b).all()) for b in self.flat_params.buffers.values()):
            return
        bad = sorted(k for k, v in self.params.items() if not bool(xp.isfinite(v).all()))
        if bad:
            raise Diverged(f"step {self.step}: parameters {bad[:3]} hold NaN/Inf; the run diverged (lower --lr); "
                           f"no checkpoint of this state was written")

    def resume(self):
        a = self.args
        result = None
        if self.rank == 0:
            try:
                path = ckpt.latest(a.checkpoint_dir) if a.resume == "latest" else a.resume
                if path is None:
                    raise ckpt.CheckpointError(f"--resume: no checkpoint (ckpt-*.ra) in {a.checkpoint_dir}")
                loaded = ckpt.read(path, config=flags.run_config(a), absent=flags.RUN_CONFIG_ADDED)
                ckpt.check_compatible(loaded["params"], self.params, "parameter", path)
                ckpt.check_compatible(loaded["optim"], self.optim.flatten_state(self.opt.state()), "optimiser state",
                                      path)
                loaded["state"] = training_state(loaded["state"], len(self.plan), path)
                result = ("ok", path, loaded)
            except ckpt.CheckpointError as e:
                result = ("error", str(e), None)
        with self.guard("resume (bcast of the checkpoint)"):
            status, info, loaded = self.world.bcast(result, root=0)
        if status == "error":
            raise ckpt.CheckpointError(info)
        # Everything validated: only now touch the live state, copied into the flat buffers (the
        # checkpoint holds the name -> array dicts, so it does not depend on the flat layout).
        self.flat_params.assign(loaded["params"])
        self.opt.load(self.optim.unflatten_state(loaded["optim"]))
        st = loaded["state"]
        self.step, self.stage, self.window = st["step"], st["stage"], st["window"]
        self.tokens_seen, self.train_time = st["tokens_seen"], st["train_time"]
        self.hp.decay_start = st["decay_start"]  # absent in checkpoints of runs without --decay-steps
        self.run_id = loaded["run_id"] or self.run_id  # keep pruning that run's files
        self.resumed_from = info
