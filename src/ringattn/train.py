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
sequences reaches --advance-accuracy. Per stage, the sequence-parallel degree is the largest
divisor of --sp leaving shards of >= --min-shard tokens (short sequences train faster
data-parallel); the math is the same for every split. Held-out evaluation runs at the final
length; the run stops at --target-accuracy, --steps or --time-limit.

Checkpoints (checkpoint.py): world rank 0 writes one every --checkpoint-interval steps and at
the end; --resume continues from the newest (or a given file) so that the loss curve equals an
uninterrupted run. A resumed run may use a different number of ranks, --sp or --layout.
"""
import argparse
import json
import os
import resource
import sys
import time

import numpy as np

from . import checkpoint as ckpt
from . import parallel
from . import slurm
from .parallel import UsageError

DEFAULT_CURRICULUM = "12:1024,32:512,128:128,512:32"
TASKS = ("needle", "synthetic", "imdb", "reuters")


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
    g.add_argument("--batch", type=int, default=16, help="global batch (sequences per step) at the final length")
    g.add_argument("--curriculum", default=None, metavar="LEN:BATCH,...",
                   help=f"shorter stages before the final --seq-len:--batch stage (stages not shorter than "
                        f"--seq-len are dropped); 'none' trains at --seq-len from the start; default: "
                        f"{DEFAULT_CURRICULUM} for needle, none for the others")
    g.add_argument("--advance-accuracy", type=float, default=0.9,
                   help="train accuracy (over the last >= 256 sequences) that moves the curriculum on")
    g.add_argument("--steps", type=int, default=3000, help="maximum optimiser steps (also the cosine horizon)")
    g.add_argument("--run-steps", type=int, default=0,
                   help="steps to run in this invocation, e.g. per Slurm allocation with --resume (0: up to --steps)")
    g.add_argument("--time-limit", type=float, default=900.0, help="stop after this many seconds (0: no limit)")
    g.add_argument("--target-accuracy", type=float, default=0.95,
                   help="stop once held-out accuracy at the final length reaches this (0: never stop early)")
    g.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, betas 0.9/0.95)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine to lr/10")
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
                   help="OpenMP/BLAS threads per rank (0: keep OMP_NUM_THREADS)")
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


def parse_curriculum(text, seq_len, batch):
    """[(length, batch), ...]: listed stages shorter than seq_len, then (seq_len, batch)."""
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
                stages.append((ln, b))
    stages.append((seq_len, batch))
    return stages


def fill_defaults(args):
    """Task-dependent defaults (seq-len, curriculum), filled in place before validation."""
    from . import data
    if args.task not in TASKS:
        raise UsageError(f"unknown --task {args.task!r}: use one of {', '.join(TASKS)}")
    if args.seq_len is None:
        args.seq_len = data.task_info(args.task)["seq_len"]
    if args.curriculum is None:
        args.curriculum = DEFAULT_CURRICULUM if args.task == "needle" else "none"
    return args


def validate(args, world):
    """Every flag problem as one UsageError; runs identically on every rank."""
    fill_defaults(args)
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
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
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
    stages = parse_curriculum(args.curriculum, args.seq_len, args.batch)
    plan = [(ln, b, parallel.adaptive_sp(ln, b, world, sp, args.min_shard)) for ln, b in stages]
    return sp, plan


def run_config(args):
    """Flags that change the math of the run: a checkpoint must match them to be resumed."""
    keys = ("task", "data", "seq_len", "width", "layers", "heads", "init_std", "embed_std", "dtype", "seed", "batch",
            "curriculum", "advance_accuracy", "steps", "lr", "warmup", "weight_decay", "clip")
    return {k: getattr(args, k) for k in keys}


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
    except (UsageError, ckpt.CheckpointError) as e:
        # Raised on every rank alike (flags and checkpoints are checked collectively): one clean line.
        if rank == 0:
            kind = "error" if isinstance(e, UsageError) else "checkpoint error"
            sys.stderr.write(f"ringattn train: {kind}: {e}\n")
            sys.stderr.flush()
        return 2


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
        self.max_sp, self.plan = validate(args, self.size)
        if args.threads:
            parallel.set_threads(args.threads)
        try:
            self.task = Task(args.task, args.data, args.seed, args.seq_len)
        except (ValueError, OSError) as e:
            raise UsageError(f"--task {args.task}: {e}") from None
        self.cfg = ModelConfig(width=args.width, layers=args.layers, heads=args.heads, dtype=args.dtype,
                               ffn_chunk=args.ffn_chunk, init_std=args.init_std, embed_std=args.embed_std,
                               **self.task.model_kwargs())
        self.xp = np if args.device == "cpu" else self._cuda()
        self.params = {k: self.xp.asarray(v) for k, v in init_params(self.cfg, seed=args.seed).items()}
        self.hp = optim.AdamWConfig(lr=args.lr, weight_decay=args.weight_decay, clip=args.clip,
                                    warmup=args.warmup, total_steps=max(args.steps, 1))
        self.optim = optim
        self.opt_state = optim.init_state(self.params)
        self.Model = BlockwiseTransformer
        self.splits = {}        # sp -> (Groups, model)
        self.step = 0
        self.stage = 0
        self.window = []        # [(correct, count)] of recent steps, for the curriculum
        self.tokens_seen = 0
        self.train_time = 0.0   # seconds of training summed over resumed runs
        self.metrics = None
        self.timers = {}        # seconds per phase since the last log line (rank 0's view)
        if args.resume:
            self._resume()

    def _cuda(self):
        from mpi4py import MPI
        try:
            import cupy
        except ImportError:
            raise UsageError("--device cuda needs CuPy (pip install cupy-cuda13x)") from None
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            raise UsageError("--device cuda: no CUDA device visible")
        local = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        cupy.cuda.Device(local.Get_rank() % n).use()
        local.Free()
        return cupy

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
            return self.xp.asarray(x), np.arange(total), labels
        pos = attn.positions(total)
        lab = labels[:, pos] if labels.ndim == 2 else labels
        return self.xp.asarray(np.ascontiguousarray(x[:, pos])), pos, np.ascontiguousarray(lab)

    # -- one optimiser step --
    def train_step(self):
        ln, batch, sp = self.plan[self.stage]
        groups, model, attn = self.split(sp)
        t0 = time.perf_counter()
        x, labels = self.task.batch(self.step, ln, batch)
        xl, pos, yl = self.local(x, labels, sp, groups, attn, ln)
        t1 = time.perf_counter()
        loss, grads, stats = model.loss_and_grads(self.params, xl, pos, yl)
        t2 = time.perf_counter()
        # One Allreduce for the gradients and the step's statistics. loss/correct/count are per
        # replica (identical on its sp ranks), so their world sum is sp x the sum over replicas.
        tot = parallel.allreduce_mean(grads, self.world, groups.dp,
                                      extra=[loss, stats["correct"], stats["count"]]) / sp
        t3 = time.perf_counter()
        gnorm = self.optim.clip_grads(grads, self.hp.clip)
        lr = self.optim.lr_at(self.step, self.hp)
        self.optim.adamw_update(self.params, grads, self.opt_state, lr, self.hp)
        t4 = time.perf_counter()
        for k, dt in (("data", t1 - t0), ("model", t2 - t1), ("allreduce", t3 - t2), ("update", t4 - t3)):
            self.timers[k] = self.timers.get(k, 0.0) + dt
        self.step += 1
        self.tokens_seen += ln * batch
        return {"loss": tot[0] / groups.dp, "correct": int(round(tot[1])), "count": int(round(tot[2])), "lr": lr,
                "grad_norm": gnorm, "seq_len": ln, "batch": batch, "sp": sp, "dp": groups.dp}

    def advance(self, rec):
        """Curriculum: move on once the last >= 256 sequences reach --advance-accuracy."""
        self.window.append((rec["correct"], rec["count"]))
        while len(self.window) > 1 and sum(c for _, c in self.window[1:]) >= 256:
            self.window.pop(0)
        c = sum(a for a, _ in self.window)
        n = sum(b for _, b in self.window)
        acc = c / max(n, 1)
        if self.stage < len(self.plan) - 1 and n >= min(256, 4 * rec["batch"]) and acc >= self.args.advance_accuracy:
            self.stage += 1
            self.window = []
            return acc, True
        return acc, False

    def evaluate(self):
        """Held-out accuracy and loss at the final length, sequences spread over the replicas."""
        ln, batch, sp = self.plan[-1]
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
            xl = self.xp.asarray(np.ascontiguousarray(x[:, pos]))
            yl = np.ascontiguousarray(y[:, pos]) if y.ndim == 2 else y
            loss, stats = model.evaluate(self.params, xl, pos, yl)
            loss_sum += loss * stats["count"]
            correct += stats["correct"]
            count += stats["count"]
        tot = parallel.allreduce_sum_scalars([loss_sum, correct, count], groups.data)
        return {"eval_accuracy": tot[1] / max(tot[2], 1), "eval_loss": tot[0] / max(tot[2], 1),
                "eval_size": int(n), "seq_len": ln}

    # -- checkpoints --
    def save(self):
        a = self.args
        if not a.checkpoint_dir:
            return None
        path = None
        if self.rank == 0:
            state = {"step": self.step, "stage": self.stage, "window": self.window,
                     "tokens_seen": self.tokens_seen, "train_time": self.train_time,
                     "world_size": self.size, "opt_step": self.opt_state["step"]}
            host = parallel.to_host
            optim = {k: host(v) for k, v in self.optim.flatten_state(self.opt_state).items()}
            path = ckpt.save(a.checkpoint_dir, self.step, run_config(a), {k: host(v) for k, v in self.params.items()},
                             optim, {}, state, keep=a.keep_checkpoints)
        self.world.Barrier()  # nobody runs ahead of a checkpoint that may be needed for a restart
        return path

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
                result = ("ok", path, loaded)
            except ckpt.CheckpointError as e:
                result = ("error", str(e), None)
        status, info, loaded = self.world.bcast(result, root=0)
        if status == "error":
            raise ckpt.CheckpointError(info)
        # Everything validated: only now touch the live state.
        for k in self.params:
            self.params[k][...] = self.xp.asarray(loaded["params"][k])
        self.opt_state = self.optim.unflatten_state(
            {k: (v if k == "step" else self.xp.asarray(v)) for k, v in loaded["optim"].items()})
        st = loaded["state"]
        self.step, self.stage = int(st["step"]), int(st["stage"])
        self.window = [tuple(w) for w in st["window"]]
        self.tokens_seen, self.train_time = int(st["tokens_seen"]), float(st["train_time"])
        self.resumed_from = info

    # -- output --
    def describe(self):
        """What this run will do, printed once by rank 0."""
        a, c = self.args, self.cfg
        n_params = sum(int(np.prod(v.shape)) for v in self.params.values())
        stages = " -> ".join(f"{ln}:{b} (sp {sp} x dp {self.size // sp})" for ln, b, sp in self.plan)
        stop = [f"{a.steps} steps"]
        if a.target_accuracy > 0:
            stop.append(f"{a.target_accuracy:.0%} held-out at length {self.plan[-1][0]} ({a.eval_size} sequences)")
        if a.time_limit:
            stop.append(f"{a.time_limit:.0f} s")
        return (f"ringattn train: task {a.task}, {self.size} ranks, {a.device}, {a.dtype}; model width {c.width}, "
                f"{c.layers} layers, {c.heads} heads, {'causal' if c.causal else 'bidirectional'}, "
                f"{n_params:,} parameters\n  stages length:batch {stages}\n"
                f"  AdamW lr {a.lr:g}, warm-up {a.warmup}, wd {a.weight_decay:g}, clip {a.clip:g}; "
                f"stop at the first of: {', '.join(stop)}")

    def emit(self, obj):
        if self.rank == 0 and self.metrics is not None:
            self.metrics.write(json.dumps(obj) + "\n")
            self.metrics.flush()

    def train(self):
        a = self.args
        t0 = time.perf_counter()
        progress = Progress(self.rank == 0, a.steps, self.step, a.no_progress)
        if self.rank == 0 and a.metrics_out:
            os.makedirs(os.path.dirname(os.path.abspath(a.metrics_out)), exist_ok=True)
            self.metrics = open(a.metrics_out, "a" if a.resume else "w")
        if self.rank == 0:
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
                    ln, b, sp = self.plan[self.stage]
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
                # Every rank must stop at the same step: rank 0's clock decides.
                if a.time_limit and self.step % 5 == 0:
                    over = self.world.bcast(time.perf_counter() - t0 + self.train_time >= a.time_limit
                                            if self.rank == 0 else None, root=0)
                    if over:
                        stop_reason = "time"
                        break
        finally:
            progress.close()
        self.train_time += time.perf_counter() - t0
        if a.checkpoint_dir and (not a.checkpoint_interval or self.step % a.checkpoint_interval):
            self.save()
        parallel.check_identical(self.params, self.world, self.step)
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = dict(self.evaluate(), step=self.step)
        reached = a.target_accuracy > 0 and last_eval["eval_accuracy"] >= a.target_accuracy
        rss = self.world.gather(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, root=0)
        final = {"final": True, "step": self.step, "eval_accuracy": last_eval["eval_accuracy"],
                 "eval_loss": last_eval["eval_loss"], "eval_seq_len": last_eval["seq_len"],
                 "reached_target": bool(reached), "stop": stop_reason, "stage": self.stage + 1,
                 "stages": len(self.plan), "time_s": self.train_time,
                 "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9), "ranks": self.size,
                 "peak_rss_mb_per_rank": rss}
        self.emit(final)
        if self.metrics:
            self.metrics.close()
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
