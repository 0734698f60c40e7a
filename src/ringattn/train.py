"""`ringattn train`: train a Blockwise Transformer with ring attention over MPI ranks.

    mpiexec -n 4 python -m mpi4py -m ringattn train            # the main job: needle, curriculum to 2048

Ranks form data-parallel replicas of `sp` consecutive ranks; each replica runs one ring over its
share of the batch (parallel.py). Every rank generates the same global batch from (seed, step),
keeps its replica's rows and its own tokens (the ring layout), and computes partial gradients;
one Allreduce makes them the full-batch gradients on every rank, and every rank applies the same
AdamW step to its copy of the parameters (checked identical every --check-interval steps).
The loss curve therefore does not depend on the number of ranks or on sp (up to float rounding).

Curriculum (needle): stages of (length, global batch), large batches at short lengths, then the
final --seq-len with --batch; the run advances when the train accuracy over the last >= 256
sequences reaches --advance-accuracy, and at the latest when the stage has used its share of
--steps (the shorter stages share the first half of the run), so the run always reaches the
asked length. An explicit --batch caps the default curriculum's batches. Per stage, the
sequence-parallel degree is the largest divisor of --sp leaving shards of >= --min-shard tokens
(short sequences train faster data-parallel); the math is the same for every split. Held-out
evaluation runs at the final length; the run stops at --target-accuracy, --steps or --time-limit
(seconds of this invocation), and with an error (exit 3) at a non-finite loss or gradient norm,
before any checkpoint of that state is written.

--device cuda (parallel.select_backend): CuPy arrays and the CUDA kernels, one GPU per rank (node-
local rank mod the GPUs visible), checked at startup on every rank; the gradients still travel as
one message per step (parallel.GradientReducer: CUDA-aware MPI on the device buffer, or one pinned
host staging buffer). The math, and so the loss curve, is the CPU run's.

Checkpoints (checkpoint.py): world rank 0 writes one every --checkpoint-interval steps and at
the end; --resume continues from the newest (or a given file) so that the loss curve equals an
uninterrupted run. A resumed run may use a different number of ranks, --sp or --layout. A fresh
run refuses a directory holding checkpoints unless --overwrite.

Every collective of the trainer runs under watchdog.guard: a rank that waits longer than
--watchdog seconds for its peers aborts the job with one line naming the rank, call and step.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np

from . import backends
from . import checkpoint as ckpt
from . import parallel, watchdog
from . import slurm
from .parallel import UsageError

DEFAULT_CURRICULUM = "12:1024,32:512,128:128,512:32"
DEFAULT_BATCH = 16
DEFAULT_WARMUP = 100
MAX_HEAD_DIM = 256  # the attention kernels' limit (api.py)
TASKS = ("needle", "synthetic", "imdb", "reuters")


class Diverged(RuntimeError):
    """A non-finite loss, gradient norm or parameter: the run stops before saving that state."""


# ---- flags ------------------------------------------------------------------------------------

def add_arguments(p):
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default="needle", choices=TASKS, help="training task")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="dataset file for imdb/reuters (Keras-format .npz); unused by needle/synthetic")
    g.add_argument("--seq-len", type=int, default=None,
                   help="final (longest) sequence length; default per task: needle 2048, synthetic 1024, "
                        "imdb 200, reuters 2400")
    g.add_argument("--width", type=int, default=64, help="model width")
    g.add_argument("--layers", type=int, default=2, help="Transformer blocks")
    g.add_argument("--heads", type=int, default=2, help="attention heads (must divide --width)")
    g.add_argument("--init-std", type=float, default=0.1, help="std of the N(0, std) Linear weight initialisation")
    g.add_argument("--embed-std", type=float, default=1.0, help="std of the N(0, std) token embedding initialisation")
    g.add_argument("--ffn-chunk", type=int, default=256, help="tokens per blockwise feed-forward chunk")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="parameter/activation dtype")
    g.add_argument("--seed", type=int, default=0, help="seed of the parameters and of every batch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=None,
                   help=f"global batch (sequences per step) at the final length; not given: {DEFAULT_BATCH}; "
                        f"given: also the most sequences any stage of the default curriculum uses")
    g.add_argument("--curriculum", default=None, metavar="LEN:BATCH,...",
                   help=f"shorter stages before the final --seq-len:--batch stage (stages not shorter than "
                        f"--seq-len are dropped; each moves on at the latest when it has used its share of the "
                        f"first half of --steps); 'none' trains at --seq-len from the start; default: "
                        f"{DEFAULT_CURRICULUM} for needle, none for the others")
    g.add_argument("--advance-accuracy", type=float, default=0.9,
                   help="train accuracy in [0, 1] (over the last >= 256 sequences) that moves the curriculum on")
    g.add_argument("--steps", type=int, default=3000, help="maximum optimiser steps (also the cosine horizon)")
    g.add_argument("--run-steps", type=int, default=0,
                   help="steps to run in this invocation, e.g. per Slurm allocation with --resume (0: up to --steps)")
    g.add_argument("--time-limit", type=float, default=0.0,
                   help="stop after this many seconds of this invocation (a resumed run gets its own; 0: no limit)")
    g.add_argument("--target-accuracy", type=float, default=0.95,
                   help="stop once held-out accuracy at the final length reaches this (0: never stop early)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, betas 0.9/0.95)")
    g.add_argument("--warmup", type=int, default=None,
                   help=f"linear warm-up steps, then cosine to lr/10; not given: min({DEFAULT_WARMUP}, --steps // 10)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay on weight matrices")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--sp", type=int, default=0,
                   help="sequence-parallel ranks per replica (must divide the rank count; 0: all ranks)")
    g.add_argument("--min-shard", type=int, default=256,
                   help="per stage, lower sp until each rank holds >= this many tokens (1: always --sp)")
    g.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag", "striped"),
                   help="how the sequence is split over a ring")
    g.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu: NumPy arrays and C++ kernels; cuda: CuPy arrays and CUDA kernels, one GPU per rank "
                        "(GPU = node-local rank modulo the GPUs visible)")
    g.add_argument("--threads", type=int, default=0,
                   help="OpenMP/BLAS threads per rank (0: OMP_NUM_THREADS if set, else the cores this rank may "
                        "use divided by the ranks sharing them)")
    g.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                   help=f"abort the job when a rank waits longer than this in a collective (0: never); not "
                        f"given: ${watchdog.ENV}, else {watchdog.DEFAULT_S:.0f}")
    g.add_argument("--check-interval", type=int, default=100,
                   help="verify parameters are identical on all ranks every N steps (0: never)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval-interval", type=int, default=25,
                   help="held-out evaluation every N steps at the final length while the train accuracy "
                        "(fresh batches: an estimate of held-out) is within 0.05 of --target-accuracy; "
                        "always at the end")
    g.add_argument("--eval-size", type=int, default=256, help="held-out sequences per evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="steps per progress/metrics line")
    g.add_argument("--metrics-out", default=None, metavar="PATH",
                   help="write JSON lines: one per logged step, evaluations, and a final summary")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="where checkpoints go (none: no checkpoints)")
    g.add_argument("--checkpoint-interval", type=int, default=200, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="FILE",
                   help="continue from FILE, or with no value from the newest in --checkpoint-dir")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --checkpoint-dir that holds checkpoints, deleting them (without it a "
                        "fresh run refuses such a directory)")


def parse_curriculum(text, seq_len, batch, max_batch=None):
    """[(length, batch), ...]: listed stages shorter than seq_len (batches capped at max_batch),
    then (seq_len, batch)."""
    stages = []
    if text and text.strip().lower() != "none":
        for item in text.split(","):
            try:
                ln, b = (int(v) for v in item.strip().split(":"))
            except ValueError:
                raise UsageError(f"--curriculum: bad stage {item.strip()!r}, expected LEN:BATCH") from None
            if ln < 1 or b < 1:
                raise UsageError(f"--curriculum: stage {item.strip()!r} needs positive length and batch")
            if stages and ln <= stages[-1][0]:
                raise UsageError(f"--curriculum: lengths must increase, got {stages[-1][0]} then {ln}")
            if ln < seq_len:
                stages.append((ln, b if max_batch is None else min(b, max_batch)))
    stages.append((seq_len, batch))
    return stages


def stage_ends(stages, steps):
    """[(length, batch, until), ...]: the stages before the last share the first half of `steps`;
    stage i moves on by step until_i at the latest (None: the final stage). Stages left no step
    (a run too short for them) are dropped."""
    pre = stages[:-1]
    out, prev = [], 0
    for i, (ln, b) in enumerate(pre):
        until = (i + 1) * steps // (2 * len(pre))
        if until > prev:
            out.append((ln, b, until))
            prev = until
    return out + [(*stages[-1], None)]


def fill_defaults(args):
    """Defaults that depend on other flags (seq-len, batch cap, curriculum, warm-up), filled in place
    before validation; calling it again changes nothing."""
    from . import data
    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}: use one of {', '.join(TASKS)}")
    if args.seq_len is None:
        args.seq_len = data.task_info(args.task)["seq_len"]
    if not hasattr(args, "stage_batch_cap"):
        # An explicit --batch also bounds the default curriculum's batches; an explicit
        # --curriculum says its own batches.
        args.stage_batch_cap = args.batch if args.curriculum is None else None
    if args.batch is None:
        args.batch = DEFAULT_BATCH
    if args.curriculum is None:
        args.curriculum = DEFAULT_CURRICULUM if args.task == "needle" else "none"
    if args.warmup is None and args.steps >= 0:
        args.warmup = min(DEFAULT_WARMUP, args.steps // 10)
    return args


def validate(args, world):
    """Every flag problem as one UsageError; runs identically on every rank."""
    fill_defaults(args)
    for name, value in sorted(vars(args).items()):  # float("nan") and float("inf") parse: refuse them here
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("seq_len", "width", "layers", "heads", "batch", "ffn_chunk", "log_interval", "eval_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("steps", "run_steps", "eval_interval", "checkpoint_interval", "check_interval", "warmup", "threads",
                 "keep_checkpoints"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.width % args.heads:
        raise UsageError(f"--heads {args.heads} does not divide --width {args.width}")
    if (args.width // args.heads) % 2:
        raise UsageError(f"head dim --width/--heads = {args.width // args.heads} must be even (RoPE)")
    if args.width // args.heads > MAX_HEAD_DIM:
        raise UsageError(f"head dim --width/--heads = {args.width // args.heads} exceeds the attention kernels' "
                         f"limit of {MAX_HEAD_DIM}: use more --heads")
    # written as "not (ok)" so that NaN (which fails every comparison) is refused too
    if not args.lr > 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    for name in ("clip", "weight_decay", "init_std", "embed_std", "time_limit"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("advance_accuracy", "target_accuracy"):
        if not 0 <= getattr(args, name) <= 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.watchdog is not None and not args.watchdog >= 0:
        raise UsageError(f"--watchdog must be >= 0 seconds (0: off), got {args.watchdog}")
    if args.watchdog is None:
        try:
            watchdog.timeout_s()
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start afresh")
    if args.device == "cuda" and args.dtype not in backends.cuda.supported_dtypes:
        raise UsageError(f"--dtype {args.dtype} is not supported with --device cuda (the CUDA kernels take "
                         f"{', '.join(backends.cuda.supported_dtypes)}): use --dtype float32, or --device cpu")
    sp = args.sp or world
    parallel.check_sp(world, sp)
    if args.seq_len < sp:
        raise UsageError(f"--seq-len {args.seq_len} is shorter than --sp {sp}: every rank needs a token")
    if args.resume and not args.checkpoint_dir and args.resume == "latest":
        raise UsageError("--resume without a FILE needs --checkpoint-dir")
    if args.task in ("imdb", "reuters") and not args.data:
        raise UsageError(f"--task {args.task} needs --data PATH ({args.task}.npz in Keras format)")
    if args.min_shard < 1:
        raise UsageError(f"--min-shard must be >= 1, got {args.min_shard}")
    stages = stage_ends(parse_curriculum(args.curriculum, args.seq_len, args.batch, args.stage_batch_cap), args.steps)
    plan = [(ln, b, parallel.adaptive_sp(ln, b, world, sp, args.min_shard), until) for ln, b, until in stages]
    return sp, plan


def run_config(args):
    """Flags that change the math of the run: a checkpoint must match them to be resumed."""
    keys = ("task", "data", "seq_len", "width", "layers", "heads", "init_std", "embed_std", "dtype", "seed", "batch",
            "curriculum", "advance_accuracy", "steps", "lr", "warmup", "weight_decay", "clip")
    return {k: getattr(args, k) for k in keys}


def training_state(st, n_stages, where):
    """The trainer's scalars from a checkpoint's state, typed; CheckpointError if any is missing or
    malformed (a checksum only proves the writer wrote it, not that it is a state of this trainer)."""
    try:
        out = {"step": int(st["step"]), "stage": int(st["stage"]), "tokens_seen": int(st["tokens_seen"]),
               "train_time": float(st["train_time"]),
               "window": [(int(c), int(n)) for c, n in st["window"]]}
    except (KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{where}: malformed training state ({type(e).__name__}: {e})") from None
    if out["step"] < 0 or not 0 <= out["stage"] < n_stages:
        raise ckpt.CheckpointError(f"{where}: malformed training state (step {out['step']}, stage {out['stage']} "
                                   f"of a {n_stages}-stage plan)")
    return out


def ring_note(plan, world, max_sp, min_shard):
    """One sentence when the final stage does not use the ring over all --sp ranks, saying why; else None."""
    ln, batch, sp, _ = plan[-1]
    if sp == max_sp:
        return None
    wider = [d for d in parallel.divisors(max_sp) if d > sp]
    d = wider[0]
    if ln // d < min_shard:
        why = (f"a ring of {d} would leave each rank < --min-shard {min_shard} tokens; pass --min-shard "
               f"{max(ln // max_sp, 1)} to force the ring")
    else:
        why = f"batch {batch} does not split over the {world // d} data-parallel replicas of sp {d}"
    return f"sp {sp} at length {ln}{' (the ring is not used)' if sp == 1 else ''}: {why}"


# ---- the run ----------------------------------------------------------------------------------

def run(args):
    from mpi4py import MPI
    world = MPI.COMM_WORLD
    parallel.install_excepthook(world)
    rank = world.Get_rank()
    pid_dir = os.environ.get("RINGATTN_PID_DIR")  # tests: lets them find (and kill) one rank
    if pid_dir:
        with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
    try:
        slurm.check_world_size(world)  # a wrong srun --mpi plugin gives N one-rank worlds: refuse
        trainer = Trainer(args, world)
        return trainer.train()
    except (UsageError, ckpt.CheckpointError, Diverged) as e:
        # Raised on every rank alike (flags and checkpoints are checked collectively; the loss and
        # gradient norm come out of one Allreduce): one clean line.
        if rank == 0:
            kind = {UsageError: "error", Diverged: "diverged"}.get(type(e), "checkpoint error")
            sys.stderr.write(f"ringattn train: {kind}: {e}\n")
            sys.stderr.flush()
        # `python -m mpi4py` aborts the job at a non-zero exit: without this barrier another rank
        # could end rank 0 before its line is out.
        with watchdog.guard("error report (barrier)", None, world):
            world.Barrier()
        return 3 if isinstance(e, Diverged) else 2


class Task:
    """The trainer's view of a task (data.py): model settings, train batches, a held-out set."""

    def __init__(self, name, path, seed, seq_len):
        from . import data
        self.data, self.name, self.seed = data, name, seed
        self.info = data.task_info(name)
        self.dataset = data.load_keras_text(path, name, seq_len=seq_len) if name in data.TEXT_TASKS else None
        if name == "needle" and seq_len < data.NEEDLE_MIN_LEN:
            raise ValueError(f"needle needs --seq-len >= {data.NEEDLE_MIN_LEN}, got {seq_len}")
        self._eval = {}

    def model_kwargs(self):
        keys = ("head", "causal", "input", "vocab", "n_classes", "in_features")
        return {k: self.info[k] for k in keys if k in self.info}

    def batch(self, step, seq_len, batch):
        return self.data.get_batch(self.name, batch, seq_len, seed=self.seed, step=step, split="train",
                                   dataset=self.dataset)

    def eval_set(self, seq_len, n, chunk=64):
        """n held-out sequences (the 'eval' stream / the test split), the same every call."""
        key = (seq_len, n)
        if key not in self._eval:
            parts = [self.data.get_batch(self.name, min(chunk, n - s), seq_len, seed=self.seed, step=i,
                                         split="eval", dataset=self.dataset)
                     for i, s in enumerate(range(0, n, chunk))]
            self._eval[key] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        return self._eval[key]


class Trainer:
    def __init__(self, args, world):
        from . import optim
        from .model import BlockwiseTransformer, ModelConfig, init_params  # noqa: F401
        self.args, self.world = args, world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.step = 0
        self.max_sp, self.plan = validate(args, self.size)
        if args.watchdog is not None:
            watchdog.set_timeout(args.watchdog)
        self.threads, self.thread_warning = parallel.configure_threads(world, args.threads)
        self.notes, self.run_id = self._prepare_checkpoint_dir()
        try:
            self.task = Task(args.task, args.data, args.seed, args.seq_len)
        except (ValueError, OSError) as e:
            raise UsageError(f"--task {args.task}: {e}") from None
        self.cfg = ModelConfig(width=args.width, layers=args.layers, heads=args.heads, dtype=args.dtype,
                               ffn_chunk=args.ffn_chunk, init_std=args.init_std, embed_std=args.embed_std,
                               **self.task.model_kwargs())
        self.be, self.gpus = parallel.select_backend(world, args.device)  # before anything is allocated
        self.xp = self.be.xp
        self.reduce = parallel.GradientReducer(world)  # one message per step, buffers kept across steps
        self.params = {k: self.be.asarray(v) for k, v in init_params(self.cfg, seed=args.seed).items()}
        self.hp = optim.AdamWConfig(lr=args.lr, weight_decay=args.weight_decay, clip=args.clip,
                                    warmup=args.warmup, total_steps=max(args.steps, 1))
        self.optim = optim
        self.opt_state = optim.init_state(self.params)
        self.Model = BlockwiseTransformer
        self.splits = {}        # sp -> (Groups, model)
        self.stage = 0
        self.window = []        # [(correct, count)] of recent steps, for the curriculum
        self.tokens_seen = 0
        self.train_time = 0.0   # seconds of training summed over resumed runs
        self.run_start = None   # perf_counter at the start of this invocation's training loop
        self.metrics = None
        self.timers = {}        # seconds per phase since the last log line (rank 0's view)
        if args.resume:
            self._resume()

    def guard(self, what):
        """Watchdog over one of the trainer's own collectives on the world."""
        return watchdog.guard(what, self.step, self.world)

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

    # -- parallel setup per stage --
    def split(self, sp):
        if sp not in self.splits:
            from .layers import LocalAttention
            from .ring import Ring
            groups = parallel.Groups(self.world, sp)
            attn = Ring(groups.seq, layout=self.args.layout) if sp > 1 else LocalAttention()
            comm = groups.seq if sp > 1 else None
            self.splits[sp] = (groups, self.Model(self.cfg, attn, comm), attn)
        return self.splits[sp]

    def local(self, x, labels, sp, groups, attn, total):
        """This rank's rows (its replica's share of the batch) and tokens (its ring shard)."""
        rows = parallel.batch_slice(x.shape[0], groups.dp, groups.replica)
        x, labels = x[rows], labels[rows]
        if sp == 1:
            return self.be.asarray(x), np.arange(total), labels
        pos = attn.positions(total)
        lab = labels[:, pos] if labels.ndim == 2 else labels
        return self.be.asarray(np.ascontiguousarray(x[:, pos])), pos, np.ascontiguousarray(lab)

    # -- one optimiser step --
    def train_step(self):
        ln, batch, sp, _ = self.plan[self.stage]
        groups, model, attn = self.split(sp)
        t0 = time.perf_counter()
        x, labels = self.task.batch(self.step, ln, batch)
        xl, pos, yl = self.local(x, labels, sp, groups, attn, ln)
        t1 = time.perf_counter()
        loss, grads, stats = model.loss_and_grads(self.params, xl, pos, yl)
        t2 = time.perf_counter()
        # One Allreduce for the gradients and the step's statistics. loss/correct/count are per
        # replica (identical on its sp ranks), so their world sum is sp x the sum over replicas.
        tot = self.reduce(grads, groups.dp, extra=[loss, stats["correct"], stats["count"]], step=self.step + 1) / sp
        t3 = time.perf_counter()
        gnorm = self.optim.clip_grads(grads, self.hp.clip)
        loss = tot[0] / groups.dp
        # Identical on every rank (one Allreduce), so every rank stops here alike, before the update.
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise Diverged(f"step {self.step + 1}: loss {loss} and gradient norm {gnorm}: not finite; the run "
                           f"diverged (lower --lr, check --init-std/--embed-std); stopped before updating the "
                           f"parameters, no checkpoint of this state was written")
        lr = self.optim.lr_at(self.step, self.hp)
        self.optim.adamw_update(self.params, grads, self.opt_state, lr, self.hp)
        t4 = time.perf_counter()
        for k, dt in (("data", t1 - t0), ("model", t2 - t1), ("allreduce", t3 - t2), ("update", t4 - t3)):
            self.timers[k] = self.timers.get(k, 0.0) + dt
        self.step += 1
        self.tokens_seen += ln * batch
        return {"loss": loss, "correct": int(round(tot[1])), "count": int(round(tot[2])), "lr": lr,
                "grad_norm": gnorm, "seq_len": ln, "batch": batch, "sp": sp, "dp": groups.dp}

    def advance(self, rec):
        """Curriculum: move on once the last >= 256 sequences reach --advance-accuracy, or once the
        stage has used its share of --steps."""
        self.window.append((rec["correct"], rec["count"]))
        while len(self.window) > 1 and sum(c for _, c in self.window[1:]) >= 256:
            self.window.pop(0)
        c = sum(a for a, _ in self.window)
        n = sum(b for _, b in self.window)
        acc = c / max(n, 1)
        until = self.plan[self.stage][3]
        learned = n >= min(256, 4 * rec["batch"]) and acc >= self.args.advance_accuracy
        if until is not None and (learned or self.step >= until):
            self.stage += 1
            self.window = []
            return acc, True
        return acc, False

    def evaluate(self):
        """Held-out accuracy and loss at the final length, sequences spread over the replicas."""
        ln, batch, sp, _ = self.plan[-1]
        groups, model, attn = self.split(sp)
        x_all, y_all = self.task.eval_set(ln, self.args.eval_size)
        n = x_all.shape[0]
        per = batch  # sequences per evaluate call, like a training step
        loss_sum = correct = count = 0.0
        chunks = [(s, min(s + per, n)) for s in range(0, n, per)]
        for i, (a, b) in enumerate(chunks):
            if i % groups.dp != groups.replica:
                continue
            x, y = x_all[a:b], y_all[a:b]
            pos = np.arange(ln) if sp == 1 else attn.positions(ln)
            xl = self.be.asarray(np.ascontiguousarray(x[:, pos]))
            yl = np.ascontiguousarray(y[:, pos]) if y.ndim == 2 else y
            loss, stats = model.evaluate(self.params, xl, pos, yl)
            loss_sum += loss * stats["count"]
            correct += stats["correct"]
            count += stats["count"]
        tot = parallel.allreduce_sum_scalars([loss_sum, correct, count], groups.data, what="evaluation allreduce",
                                             step=self.step)
        return {"eval_accuracy": tot[1] / max(tot[2], 1), "eval_loss": tot[0] / max(tot[2], 1),
                "eval_size": int(n), "seq_len": ln}

    # -- checkpoints --
    def save(self):
        a = self.args
        if not a.checkpoint_dir:
            return None
        self.check_finite()
        path = None
        if self.rank == 0:
            state = {"step": self.step, "stage": self.stage, "window": self.window,
                     "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                     "world_size": self.size, "opt_step": self.opt_state["step"]}
            host = parallel.to_host
            optim = {k: host(v) for k, v in self.optim.flatten_state(self.opt_state).items()}
            path = ckpt.save(a.checkpoint_dir, self.step, run_config(a), {k: host(v) for k, v in self.params.items()},
                             optim, {}, state, keep=a.keep_checkpoints, run_id=self.run_id)
        with self.guard("checkpoint barrier"):
            self.world.Barrier()  # nobody runs ahead of a checkpoint that may be needed for a restart
        return path

    def check_finite(self):
        """Refuse to save or report non-finite parameters (identical on every rank, so no collective)."""
        xp = self.xp
        bad = sorted(k for k, v in self.params.items() if not bool(xp.isfinite(v).all()))
        if bad:
            raise Diverged(f"step {self.step}: parameters {bad[:3]} hold NaN/Inf; the run diverged (lower --lr); "
                           f"no checkpoint of this state was written")

    def _resume(self):
        a = self.args
        result = None
        if self.rank == 0:
            try:
                path = ckpt.latest(a.checkpoint_dir) if a.resume == "latest" else a.resume
                if path is None:
                    raise ckpt.CheckpointError(f"--resume: no checkpoint (ckpt-*.ra) in {a.checkpoint_dir}")
                loaded = ckpt.read(path, config=run_config(a))
                ckpt.check_compatible(loaded["params"], self.params, "parameter", path)
                ckpt.check_compatible(loaded["optim"], self.optim.flatten_state(self.opt_state), "optimiser state", path)
                loaded["state"] = training_state(loaded["state"], len(self.plan), path)
                result = ("ok", path, loaded)
            except ckpt.CheckpointError as e:
                result = ("error", str(e), None)
        with self.guard("resume (bcast of the checkpoint)"):
            status, info, loaded = self.world.bcast(result, root=0)
        if status == "error":
            raise ckpt.CheckpointError(info)
        # Everything validated: only now touch the live state.
        for k in self.params:
            self.params[k][...] = self.be.asarray(loaded["params"][k])
        self.opt_state = self.optim.unflatten_state(
            {k: (v if k == "step" else self.be.asarray(v)) for k, v in loaded["optim"].items()})
        st = loaded["state"]
        self.step, self.stage, self.window = st["step"], st["stage"], st["window"]
        self.tokens_seen, self.train_time = st["tokens_seen"], st["train_time"]
        self.run_id = loaded["run_id"] or self.run_id  # keep pruning that run's files
        self.resumed_from = info

    # -- output --
    def describe(self):
        """What this run will do, printed once by rank 0."""
        a, c = self.args, self.cfg
        n_params = sum(int(np.prod(v.shape)) for v in self.params.values())
        stages = " -> ".join(f"{ln}:{b} (sp {sp} x dp {self.size // sp}{'' if until is None else f', by step {until}'})"
                             for ln, b, sp, until in self.plan)
        note = ring_note(self.plan, self.size, self.max_sp, a.min_shard)
        stop = [f"{a.steps} steps"]
        if a.target_accuracy > 0:
            stop.append(f"{a.target_accuracy:.0%} held-out at length {self.plan[-1][0]} ({a.eval_size} sequences)")
        if a.time_limit:
            stop.append(f"{a.time_limit:.0f} s of this run")
        threads = f"{self.threads} thread{'' if self.threads == 1 else 's'} per rank"
        if self.gpus:
            visible = sorted({n for _, n in self.gpus})
            how = "pinned host staging" if self.reduce.staged(self.be) else "CUDA-aware MPI"
            threads = (f"one GPU per rank: node-local rank mod {'/'.join(map(str, visible))} visible, "
                       f"gradients over {how}; {threads}")
        return (f"ringattn train: task {a.task}, {self.size} ranks, {a.device} ({threads}), {a.dtype}; "
                f"model width {c.width}, "
                f"{c.layers} layers, {c.heads} heads, {'causal' if c.causal else 'bidirectional'}, "
                f"{n_params:,} parameters\n  stages length:batch {stages}\n"
                + (f"  {note}\n" if note else "") +
                f"  AdamW lr {a.lr:g}, warm-up {a.warmup}, wd {a.weight_decay:g}, clip {a.clip:g}; "
                f"stop at the first of: {', '.join(stop)}")

    def emit(self, obj):
        if self.rank == 0 and self.metrics is not None:
            # allow_nan=False: a NaN would make the line invalid JSON; divergence stops the run first
            self.metrics.write(json.dumps(obj, allow_nan=False) + "\n")
            self.metrics.flush()

    def train(self):
        try:
            return self._train()
        except Diverged as e:
            self.emit({"final": True, "stop": "diverged", "step": self.step, "error": str(e)})
            raise
        finally:
            if self.metrics:
                self.metrics.close()
                self.metrics = None

    def _train(self):
        a = self.args
        t0 = self.run_start = time.perf_counter()
        progress = Progress(self.rank == 0, a.steps, self.step, a.no_progress)
        if self.rank == 0 and a.metrics_out:
            os.makedirs(os.path.dirname(os.path.abspath(a.metrics_out)), exist_ok=True)
            self.metrics = open(a.metrics_out, "a" if a.resume else "w")
        if self.rank == 0:
            for line in ([self.thread_warning] if self.thread_warning else []) + self.notes:
                progress.write(f"ringattn train: {line}")
            progress.write(self.describe())
        if self.rank == 0 and getattr(self, "resumed_from", None):
            progress.write(f"resumed from {self.resumed_from} at step {self.step}")
        last_eval, reached, stop_reason = None, False, "steps"
        tick, tick_tokens = time.perf_counter(), self.tokens_seen
        end = min(a.steps, self.step + a.run_steps) if a.run_steps else a.steps
        try:
            while self.step < end:
                rec = self.train_step()
                acc, moved = self.advance(rec)
                rec.update(step=self.step, accuracy=rec["correct"] / max(rec["count"], 1), window_accuracy=acc)
                if moved and self.rank == 0:
                    ln, b, sp, _ = self.plan[self.stage]
                    progress.write(f"step {self.step}: train accuracy {acc:.3f} -> stage {self.stage + 1}/"
                                   f"{len(self.plan)}: length {ln}, batch {b}, sp {sp}")
                if a.check_interval and self.step % a.check_interval == 0:
                    parallel.check_identical(self.params, self.world, self.step)
                elapsed = time.perf_counter() - t0
                if self.step % a.log_interval == 0 or self.step == end:
                    now = time.perf_counter()
                    tps = (self.tokens_seen - tick_tokens) / max(now - tick, 1e-9)
                    tick, tick_tokens = now, self.tokens_seen
                    line = {k: rec[k] for k in ("step", "loss", "accuracy", "window_accuracy", "lr", "grad_norm",
                                                "seq_len", "batch", "sp", "dp")}
                    line.update(tokens_per_s=tps, elapsed_s=self.train_time + elapsed,
                                **{f"t_{k}": round(v, 4) for k, v in self.timers.items()})
                    self.timers = {}
                    self.emit(line)
                    progress.update(self.step, line)
                final_stage = self.stage == len(self.plan) - 1
                if (final_stage and a.target_accuracy > 0 and a.eval_interval and self.step % a.eval_interval == 0
                        and acc >= a.target_accuracy - 0.05):
                    last_eval = dict(self.evaluate(), step=self.step,
                                     elapsed_s=self.train_time + time.perf_counter() - t0)
                    self.emit(last_eval)
                    progress.write(f"step {self.step}: held-out accuracy {last_eval['eval_accuracy']:.4f} "
                                   f"loss {last_eval['eval_loss']:.4f} at length {last_eval['seq_len']}")
                    if last_eval["eval_accuracy"] >= a.target_accuracy:
                        reached, stop_reason = True, "target"
                        break
                if a.checkpoint_dir and a.checkpoint_interval and self.step % a.checkpoint_interval == 0:
                    self.train_time += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    self.save()
                # Every rank must stop at the same step: rank 0's clock decides. The limit is this
                # invocation's own (a resumed run gets the full limit again).
                if a.time_limit and self.step % 5 == 0:
                    with self.guard("time-limit check (bcast)"):
                        over = self.world.bcast(time.perf_counter() - self.run_start >= a.time_limit
                                                if self.rank == 0 else None, root=0)
                    if over:
                        stop_reason = "time"
                        break
        finally:
            progress.close()
        self.train_time += time.perf_counter() - t0
        self.check_finite()
        if a.checkpoint_dir and (not a.checkpoint_interval or self.step % a.checkpoint_interval):
            self.save()
        parallel.check_identical(self.params, self.world, self.step)
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = dict(self.evaluate(), step=self.step)
        reached = a.target_accuracy > 0 and last_eval["eval_accuracy"] >= a.target_accuracy
        with self.guard("memory report (gather)"):
            rss = self.world.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, root=0)
        final = {"final": True, "step": self.step, "eval_accuracy": last_eval["eval_accuracy"],
                 "eval_loss": last_eval["eval_loss"], "eval_seq_len": last_eval["seq_len"],
                 "reached_target": bool(reached), "stop": stop_reason, "stage": self.stage + 1,
                 "stages": len(self.plan), "time_s": self.train_time,
                 "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9), "ranks": self.size,
                 "peak_rss_mb_per_rank": rss}
        self.emit(final)
        if self.rank == 0:
            print(summary_text(final, self.plan), flush=True)
        return 0


def summary_text(final, plan):
    rss = final["peak_rss_mb_per_rank"] or []
    return "\n".join([
        f"ringattn train: {final['stop']} stop at step {final['step']} (stage {final['stage']}/{final['stages']}: "
        f"length {plan[final['stage'] - 1][0]})",
        f"  held-out accuracy {final['eval_accuracy']:.4f}, loss {final['eval_loss']:.4f} at length "
        f"{final['eval_seq_len']}{'  (target reached)' if final['reached_target'] else ''}",
        f"  time {final['time_s']:.1f} s, {final['tokens_per_s']:.0f} tokens/s over {final['ranks']} ranks",
        "  peak memory per rank (RSS MiB): " + ", ".join(f"{m:.0f}" for m in rss),
    ])


class Progress:
    """tqdm bar on rank 0 when installed, else one plain line per log interval; silent elsewhere."""

    def __init__(self, active, total, initial, plain):
        self.active, self.bar = active, None
        if active and not plain:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step, line):
        if not self.active:
            return
        post = {"loss": f"{line['loss']:.4f}", "acc": f"{line['accuracy']:.3f}",
                "tok/s": f"{line['tokens_per_s']:.0f}", "len": line["seq_len"]}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(post, refresh=True)
        else:
            print(f"step {step}: " + " ".join(f"{k} {v}" for k, v in post.items()), file=sys.stderr, flush=True)

    def write(self, text):
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    raise SystemExit(run(ap.parse_args()))
