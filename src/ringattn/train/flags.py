"""`ringattn train`'s flags: the parser, the defaults that depend on other flags, validation,
the curriculum, and which flags a checkpoint must match. Tasks add their own flags and defaults
(tasks/); nothing here names a task."""
import argparse
import math

from .. import backends, parallel, tasks, watchdog
from ..parallel import UsageError

DEFAULT_BATCH = 16
DEFAULT_WARMUP = 100
MAX_HEAD_DIM = 256  # the attention kernels' limit (api.py)


def task_class(args):
    """The class of --task; UsageError naming the known tasks otherwise."""
    try:
        return tasks.get(args.task)
    except ValueError:
        raise UsageError(f"unknown --task {args.task!r}: use one of {', '.join(tasks.names())}") from None


class Experiment(argparse.Action):
    """--experiment TASK: parse the task's `experiment` flags into the namespace where it stands,
    so that flags after it override them."""

    def __call__(self, parser, namespace, value, option_string=None):
        setattr(namespace, self.dest, value)
        parser.parse_args(list(tasks.get(value).experiment), namespace)


def add_arguments(p):
    g = p.add_argument_group("task and model")
    known = [tasks.get(n) for n in tasks.names()]
    g.add_argument("--task", default="needle", choices=[t.name for t in known], help="training task")
    g.add_argument("--experiment", action=Experiment, default=None, metavar="TASK",
                   choices=[t.name for t in known if t.experiment],
                   help="the reference presentation's run of TASK (its task, model and schedule flags; "
                        "flags after it override it)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help=f"dataset file for {'/'.join(t.name for t in known if t.needs_data)} (Keras-format .npz); "
                        f"unused by {'/'.join(t.name for t in known if not t.needs_data)}")
    g.add_argument("--seq-len", type=int, default=None,
                   help="final (longest) sequence length; default per task: "
                        + ", ".join(f"{t.name} {t.seq_len}" for t in known))
    g.add_argument("--width", type=int, default=64, help="model width")
    g.add_argument("--layers", type=int, default=2, help="Transformer blocks")
    g.add_argument("--heads", type=int, default=2, help="attention heads (must divide --width)")
    g.add_argument("--init-std", type=float, default=0.1, help="std of the N(0, std) Linear weight initialisation")
    g.add_argument("--embed-std", type=float, default=1.0, help="std of the N(0, std) token embedding initialisation")
    g.add_argument("--ffn-chunk", type=int, default=256, help="tokens per blockwise feed-forward chunk")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="parameter/activation dtype")
    g.add_argument("--seed", type=int, default=0, help="seed of the parameters and of every batch")
    for t in known:
        t.add_arguments(g)

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=None,
                   help=f"global batch (sequences per step) at the final length; not given: {DEFAULT_BATCH}; "
                        f"given: also the most sequences any stage of the default curriculum uses")
    g.add_argument("--curriculum", default=None, metavar="LEN:BATCH,...",
                   help=f"shorter stages before the final --seq-len:--batch stage (stages not shorter than "
                        f"--seq-len are dropped; each moves on at the latest when it has used its share of the "
                        f"first half of --steps); 'none' trains at --seq-len from the start; default: "
                        + ", ".join(f"{t.curriculum} for {t.name}" for t in known if t.curriculum != "none")
                        + ", none for the others")
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
    g.add_argument("--decay-steps", type=int, default=None,
                   help="> 0: hold the peak lr after the warm-up until the final curriculum stage begins, then "
                        "cosine to lr/10 over this many steps (0: cosine over --steps); not given: the task's "
                        "default (needle: 400, others: 0)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="decoupled weight decay on weight matrices")
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--sp", type=int, default=0,
                   help="sequence-parallel ranks per replica (must divide the rank count; 0: all ranks)")
    g.add_argument("--min-shard", type=int, default=256,
                   help="per stage, lower sp until each rank holds >= this many tokens (1: always --sp)")
    g.add_argument("--window", type=int, default=None, metavar="LEFT",
                   help="sliding-window attention: each token attends to the LEFT tokens before it and itself "
                        "(and the LEFT after it for a non-causal task); with a window shorter than a shard, "
                        "--layout contiguous runs the fewest ring steps; not given: full attention")
    g.add_argument("--local-window", type=_window_or_none, default=None, metavar="W",
                   help="local/global layers: the first layer and every other one after it, never the last, "
                        "attend only to the W tokens before each token and itself, the others as --window says; "
                        "'none': every layer alike; not given: the task's default (needle: 8, others: none)")
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
                        "(fresh batches: an estimate of held-out) is within 0.05 of --target-accuracy "
                        "(such a check stops once the misses so far rule the target out); always at the "
                        "end, on the whole set")
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


def _window_or_none(text):
    """--local-window's value: a token count >= 0, or 'none' (-1)."""
    if text.strip().lower() == "none":
        return -1
    try:
        w = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0 or 'none', got {text!r}") from None
    if w < 0:
        raise argparse.ArgumentTypeError(f"expected a token count >= 0 or 'none', got {text!r}")
    return w


def fill_defaults(args):
    """Defaults that depend on other flags (seq-len, batch cap, curriculum, warm-up), filled in place
    before validation; calling it again changes nothing."""
    task = task_class(args)
    if args.seq_len is None:
        args.seq_len = task.seq_len
    if not hasattr(args, "stage_batch_cap"):
        # An explicit --batch also bounds the default curriculum's batches; an explicit
        # --curriculum says its own batches.
        args.stage_batch_cap = args.batch if args.curriculum is None else None
    if args.batch is None:
        args.batch = DEFAULT_BATCH
    if args.curriculum is None:
        args.curriculum = task.curriculum
    if args.local_window is None:
        args.local_window = task.local_window
    if args.decay_steps is None:
        args.decay_steps = task.decay_steps
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
    for name in ("steps", "decay_steps", "run_steps", "eval_interval", "checkpoint_interval", "check_interval", "warmup", "threads",
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
    task_class(args).check_flags(args)
    if args.window is not None and args.window < 0:
        raise UsageError(f"--window must be >= 0 (tokens before each token), got {args.window}")
    if args.min_shard < 1:
        raise UsageError(f"--min-shard must be >= 1, got {args.min_shard}")
    stages = stage_ends(parse_curriculum(args.curriculum, args.seq_len, args.batch, args.stage_batch_cap), args.steps)
    plan = [(ln, b, parallel.adaptive_sp(ln, b, world, sp, args.min_shard), until) for ln, b, until in stages]
    return sp, plan


# run_config keys added after checkpoints without them were written, and the value such a file means
RUN_CONFIG_ADDED = {"decay_steps": 0, "local_window": -1}


def run_config(args):
    """Flags that change the math of the run: a checkpoint must match them to be resumed."""
    keys = ("task", "data", "seq_len", "width", "layers", "heads", "init_std", "embed_std", "dtype", "seed", "batch",
            "curriculum", "advance_accuracy", "steps", "lr", "warmup", "weight_decay", "clip", "window",
            "decay_steps")
    cfg = {k: getattr(args, k) for k in keys + task_class(args).options}
    # the local window the model uses: none with one layer (ModelConfig.layer_window keeps the last global)
    cfg["local_window"] = args.local_window if args.layers > 1 else -1
    return cfg
