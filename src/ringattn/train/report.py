"""What `ringattn train` prints and writes: the banner, the ring note, log fields, the metrics
file and the final summary. Rank 0 prints; every function here is pure text except Metrics."""
import json
import os

import numpy as np

from .. import parallel

LOG_KEYS = ("step", "loss", "accuracy", "window_accuracy", "lr", "grad_norm", "seq_len", "batch", "sp", "dp")


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


def describe(t):
    """What the run of trainer `t` will do, printed once by rank 0."""
    a, c = t.args, t.cfg
    n_params = sum(int(np.prod(v.shape)) for v in t.params.values())
    stages = " -> ".join(f"{ln}:{b} (sp {sp} x dp {t.size // sp}{'' if until is None else f', by step {until}'})"
                         for ln, b, sp, until in t.plan)
    note = ring_note(t.plan, t.size, t.max_sp, a.min_shard)
    stop = [f"{a.steps} steps"]
    if a.target_accuracy > 0:
        stop.append(f"{a.target_accuracy:.0%} held-out at length {t.plan[-1][0]} ({a.eval_size} sequences)")
    if a.time_limit:
        stop.append(f"{a.time_limit:.0f} s of this run")
    threads = f"{t.threads} thread{'' if t.threads == 1 else 's'} per rank"
    wins = [c.layer_window(i) for i in range(c.layers)]
    attention = "full attention" if set(wins) == {-1} else "windows per layer " + "/".join(
        "full" if w < 0 else str(w) for w in wins)
    if t.gpus:
        visible = sorted({n for _, n in t.gpus})
        how = "pinned host staging" if t.reduce.staged(t.be) else "CUDA-aware MPI"
        threads = (f"one GPU per rank: node-local rank mod {'/'.join(map(str, visible))} visible, "
                   f"gradients over {how}; {threads}")
    return (f"ringattn train: task {a.task}, {t.size} ranks, {a.device} ({threads}), {a.dtype}; "
            f"model width {c.width}, "
            f"{c.layers} layers, {c.heads} heads, {'causal' if c.causal else 'bidirectional'} {attention}, "
            f"{n_params:,} parameters\n  stages length:batch {stages}\n"
            + (f"  {note}\n" if note else "") +
            f"  AdamW lr {a.lr:g}, warm-up {a.warmup}, "
            + (f"decay over {a.decay_steps} steps from the final stage, " if a.decay_steps else "") +
            f"wd {a.weight_decay:g}, clip {a.clip:g}; "
            f"stop at the first of: {', '.join(stop)}")


def progress_fields(line):
    """The progress bar's postfix (or plain line) of one logged step."""
    return {"loss": f"{line['loss']:.4f}", "acc": f"{line['accuracy']:.3f}",
            "tok/s": f"{line['tokens_per_s']:.0f}", "len": line["seq_len"]}


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


class Metrics:
    """--metrics-out: one JSON object per line, written by rank 0 only (None path: nothing)."""

    def __init__(self, path, append):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a" if append else "w")

    def emit(self, obj):
        if self.f is not None:
            # allow_nan=False: a NaN would make the line invalid JSON; divergence stops the run first
            self.f.write(json.dumps(obj, allow_nan=False) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None
