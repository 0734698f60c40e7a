"""The Trainer: one run of `ringattn train`, read top-down.

    Trainer(args, world)      flags validated, threads and device chosen, task, model, optimiser
    .train()                  the loop: step -> curriculum -> log -> evaluate -> checkpoint -> stop?
                              then the final checkpoint, evaluation and summary

One step (train_step): every rank makes the same global batch from (seed, step), keeps its
replica's rows and its own tokens, computes partial gradients, and ONE Allreduce makes them the
full-batch gradients everywhere; every rank applies the same AdamW update. Parameters, gradients
and the AdamW moments live in flat buffers of one layout (flat.py): the model writes its gradients
into views of the gradient buffer, the Allreduce sends that buffer itself (the step's statistics in
its tail), and the update is one backend call per span (weight-decayed arrays, then the others).
"""
import math
import time

import numpy as np

from .. import flat, gradients, machine, parallel, threads, transport, watchdog
from ..parallel import UsageError
from . import flags, report
from .errors import Diverged
from .state import Checkpoints


STEP_STATS = ("loss", "correct", "count")  # summed in the gradient Allreduce, in the buffer's tail


class Trainer(Checkpoints):
    def __init__(self, args, world):
        from .. import optim
        from ..model import ModelConfig, init_params, is_decayed
        self.args, self.world = args, world
        self.rank, self.size = world.Get_rank(), world.Get_size()
        self.step = 0
        self.max_sp, self.plan = flags.validate(args, self.size)
        if args.watchdog is not None:
            watchdog.set_timeout(args.watchdog)
        self.threads, self.thread_warning = threads.configure_threads(world, args.threads)
        self.notes, self.run_id = self._prepare_checkpoint_dir()
        try:
            self.task = flags.task_class(args)(args)
        except (ValueError, OSError) as e:
            raise UsageError(f"--task {args.task}: {e}") from None
        self.cfg = ModelConfig(width=args.width, layers=args.layers, heads=args.heads, dtype=args.dtype,
                               ffn_chunk=args.ffn_chunk, init_std=args.init_std, embed_std=args.embed_std,
                               window=-1 if args.window is None else args.window, local_window=args.local_window,
                               **self.task.model_kwargs())
        self.be, self.gpus = parallel.select_backend(world, args.device)  # before anything is allocated
        self.xp = self.be.xp
        # One message per step, buffers kept across steps; a sleeping wait where ranks outnumber cores.
        self.reduce = gradients.GradientReducer(world, poll_s=gradients.poll_interval(world))
        init = init_params(self.cfg, seed=args.seed)
        layout = flat.plan_like(init, is_decayed)
        self.flat_params = flat.FlatArrays(layout, self.be).assign(init)
        self.params = self.flat_params.arrays   # name -> view into the flat buffer
        self.flat_grads = flat.FlatArrays(layout, self.be, tail=len(STEP_STATS))
        self.grads = self.flat_grads.arrays     # the model writes each step's gradients into these views
        self.hp = optim.AdamWConfig(lr=args.lr, weight_decay=args.weight_decay, clip=args.clip,
                                    warmup=args.warmup, total_steps=max(args.steps, 1),
                                    decay_steps=args.decay_steps)
        self.optim = optim
        self.opt = optim.FlatAdamW(self.flat_params)
        self.splits = {}        # sp -> (Groups, model, attention)
        self.stage = 0
        self.window = []        # [(correct, count)] of recent steps, for the curriculum
        self.tokens_seen = 0
        self.train_time = 0.0   # seconds of training summed over resumed runs
        self.run_start = None   # perf_counter at the start of this invocation's training loop
        self.metrics = report.Metrics(None, False)
        self.timers = {}        # seconds per phase since the last log line (rank 0's view)
        self.resumed_from = None
        if args.resume:
            self.resume()

    def guard(self, what):
        """Watchdog over one of the trainer's own collectives on the world."""
        return watchdog.guard(what, self.step, self.world)

    # -- parallel setup per stage --
    def split(self, sp):
        if sp not in self.splits:
            from ..layers import LocalAttention, Workspace
            from ..model import BlockwiseTransformer
            from ..ring import Ring
            groups = parallel.Groups(self.world, sp)
            progress = transport.oversubscribed_progress(self.reduce.poll_s is not None)
            attn = Ring(groups.seq, layout=self.args.layout, progress=progress) if sp > 1 else LocalAttention()
            comm = groups.seq if sp > 1 else None
            # one workspace for every stage's model: only the current stage's buffers are kept
            self.workspace = getattr(self, "workspace", None) or Workspace()
            self.splits[sp] = (groups, BlockwiseTransformer(self.cfg, attn, comm, workspace=self.workspace), attn)
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
        loss, _, stats = model.loss_and_grads(self.params, xl, pos, yl, grads=self.grads)  # into the views
        t2 = time.perf_counter()
        # One Allreduce for the gradients and the step's statistics (STEP_STATS). loss/correct/count
        # are per replica (identical on its sp ranks), so their world sum is sp x the sum over replicas.
        tot = self.reduce.flat(self.flat_grads, groups.dp, extra=[loss, stats["correct"], stats["count"]],
                               step=self.step + 1) / sp
        t3 = time.perf_counter()
        gnorm = self.optim.flat_global_norm(self.flat_grads)
        loss = tot[0] / groups.dp
        # Identical on every rank (one Allreduce), so every rank stops here alike, before the update.
        if not (math.isfinite(loss) and math.isfinite(gnorm)):
            raise Diverged(f"step {self.step + 1}: loss {loss} and gradient norm {gnorm}: not finite; the run "
                           f"diverged (lower --lr, check --init-std/--embed-std); stopped before updating the "
                           f"parameters, no checkpoint of this state was written")
        if self.hp.decay_start is None and self.stage == len(self.plan) - 1:
            self.hp.decay_start = self.step  # --decay-steps: the decay starts with the final stage
        lr = self.optim.lr_at(self.step, self.hp)
        self.opt.update(self.flat_params, self.flat_grads, lr, self.hp,
                        grad_scale=self.optim.clip_scale(gnorm, self.hp.clip))
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

    def evaluate(self, stop_below=None):
        """Held-out accuracy and loss at the final length, sequences spread over the replicas.

        stop_below=a: stop early once accuracy a can no longer be reached (the misses so far exceed
        what the whole set allows), with the same decision on every rank: a mid-run check against the
        target then costs only the sequences it needs. Such a result covers the sequences evaluated
        ("eval_size") and says "eval_complete": False; the decision (accuracy >= a or not) is the
        one the whole set would give."""
        ln, batch, sp, _ = self.plan[-1]
        groups, model, attn = self.split(sp)
        x_all, y_all = self.task.eval_set(ln, self.args.eval_size)
        n = x_all.shape[0]
        per = batch  # sequences per evaluate call, like a training step
        labelled = int((y_all >= 0).sum()) if y_all.ndim == 2 else n  # the count the whole set scores
        chunks = [(s, min(s + per, n)) for s in range(0, n, per)]
        part = np.zeros(3)  # this replica's (loss sum, correct, count) not yet summed over the replicas
        tot = np.zeros(3)
        done = n
        for i, (a, b) in enumerate(chunks):
            if i % groups.dp == groups.replica:
                x, y = x_all[a:b], y_all[a:b]
                pos = np.arange(ln) if sp == 1 else attn.positions(ln)
                xl = self.be.asarray(np.ascontiguousarray(x[:, pos]))
                yl = np.ascontiguousarray(y[:, pos]) if y.ndim == 2 else y
                loss, stats = model.evaluate(self.params, xl, pos, yl)
                part += (loss * stats["count"], stats["correct"], stats["count"])
            round_end = i % groups.dp == groups.dp - 1 or i == len(chunks) - 1
            if round_end and (stop_below is not None or i == len(chunks) - 1):
                tot += machine.allreduce_sum_small(part, groups.data, what="evaluation allreduce", step=self.step)
                part[:] = 0
                if stop_below is not None and (tot[1] + labelled - tot[2]) < stop_below * labelled:
                    done = b  # every remaining label right would still miss the target
                    break
        out = {"eval_accuracy": tot[1] / max(tot[2], 1), "eval_loss": tot[0] / max(tot[2], 1),
               "eval_size": int(done), "seq_len": ln}
        if done < n:
            out["eval_complete"] = False
        return out

    # -- the run --
    def train(self):
        try:
            return self._train()
        except Diverged as e:
            self.metrics.emit({"final": True, "stop": "diverged", "step": self.step, "error": str(e)})
            raise
        finally:
            self.metrics.close()

    def _train(self):
        from ..progress import Progress
        a = self.args
        self.run_start = self._t0 = time.perf_counter()
        self.progress = Progress(a.steps, self.step, active=self.rank == 0, plain=a.no_progress)
        if self.rank == 0:
            self.metrics = report.Metrics(a.metrics_out, append=bool(a.resume))
            self._banner()
        self.last_eval, stop = None, "steps"
        self._tick, self._tick_tokens = time.perf_counter(), self.tokens_seen
        end = min(a.steps, self.step + a.run_steps) if a.run_steps else a.steps
        try:
            while self.step < end:
                rec = self.train_step()
                self._advance_curriculum(rec)
                if a.check_interval and self.step % a.check_interval == 0:
                    gradients.check_identical(self.params, self.world, self.step)
                self._log(rec, end)
                if self._evaluate_if_close(rec["window_accuracy"]):
                    stop = "target"
                    break
                if a.checkpoint_dir and a.checkpoint_interval and self.step % a.checkpoint_interval == 0:
                    self._bank_time()
                    self.save()
                if self._time_is_up():
                    stop = "time"
                    break
        finally:
            self.progress.close()
        return self._finish(stop)

    def _banner(self):
        for line in ([self.thread_warning] if self.thread_warning else []) + self.notes:
            self.progress.write(f"ringattn train: {line}")
        self.progress.write(report.describe(self))
        if self.resumed_from:
            self.progress.write(f"resumed from {self.resumed_from} at step {self.step}")

    def _advance_curriculum(self, rec):
        acc, moved = self.advance(rec)
        rec.update(step=self.step, accuracy=rec["correct"] / max(rec["count"], 1), window_accuracy=acc)
        if moved and self.rank == 0:
            ln, b, sp, _ = self.plan[self.stage]
            self.progress.write(f"step {self.step}: train accuracy {acc:.3f} -> stage {self.stage + 1}/"
                                f"{len(self.plan)}: length {ln}, batch {b}, sp {sp}")

    def _log(self, rec, end):
        """Every --log-interval steps and at the last: one metrics line and the progress display."""
        elapsed = time.perf_counter() - self._t0
        if self.step % self.args.log_interval and self.step != end:
            return
        now = time.perf_counter()
        tps = (self.tokens_seen - self._tick_tokens) / max(now - self._tick, 1e-9)
        self._tick, self._tick_tokens = now, self.tokens_seen
        line = {k: rec[k] for k in report.LOG_KEYS}
        line.update(tokens_per_s=tps, elapsed_s=self.train_time + elapsed,
                    **{f"t_{k}": round(v, 4) for k, v in self.timers.items()})
        self.timers = {}
        self.metrics.emit(line)
        self.progress.update(self.step, report.progress_fields(line))

    def _evaluate_if_close(self, train_acc):
        """Held-out evaluation every --eval-interval steps of the final stage once the train accuracy
        is within 0.05 of the target; True when the target is reached."""
        a = self.args
        if not (self.stage == len(self.plan) - 1 and a.target_accuracy > 0 and a.eval_interval
                and self.step % a.eval_interval == 0 and train_acc >= a.target_accuracy - 0.05):
            return False
        self.last_eval = dict(self.evaluate(stop_below=a.target_accuracy), step=self.step,
                              elapsed_s=self.train_time + time.perf_counter() - self._t0)
        self.metrics.emit(self.last_eval)
        e = self.last_eval
        if "eval_complete" in e:
            self.progress.write(f"step {self.step}: held-out accuracy below {a.target_accuracy:.2f} (stopped after "
                                f"{e['eval_size']} of {a.eval_size} sequences: {e['eval_accuracy']:.4f} on those)")
        else:
            self.progress.write(f"step {self.step}: held-out accuracy {e['eval_accuracy']:.4f} "
                                f"loss {e['eval_loss']:.4f} at length {e['seq_len']}")
        return self.last_eval["eval_accuracy"] >= a.target_accuracy

    def _bank_time(self):
        """Add the time since the last banking to train_time (checkpoints then carry it)."""
        self.train_time += time.perf_counter() - self._t0
        self._t0 = time.perf_counter()

    def _time_is_up(self):
        """--time-limit: every rank must stop at the same step, so rank 0's clock decides. The limit
        is this invocation's own (a resumed run gets the full limit again)."""
        a = self.args
        if not (a.time_limit and self.step % 5 == 0):
            return False
        with self.guard("time-limit check (bcast)"):
            return self.world.bcast(time.perf_counter() - self.run_start >= a.time_limit
                                    if self.rank == 0 else None, root=0)

    def _finish(self, stop):
        """The end of a run: final checkpoint, replicas checked, final evaluation, summary."""
        a = self.args
        self.train_time += time.perf_counter() - self._t0
        self.check_finite()
        if a.checkpoint_dir and (not a.checkpoint_interval or self.step % a.checkpoint_interval):
            self.save()
        gradients.check_identical(self.params, self.world, self.step)
        last = self.last_eval
        if last is None or last["step"] != self.step or "eval_complete" in last:
            last = dict(self.evaluate(), step=self.step)  # the summary's figure covers the whole set
        reached = a.target_accuracy > 0 and last["eval_accuracy"] >= a.target_accuracy
        with self.guard("memory report (gather)"):
            rss = self.world.gather(machine.peak_rss_kib() / 1024.0, root=0)
        final = {"final": True, "step": self.step, "eval_accuracy": last["eval_accuracy"],
                 "eval_loss": last["eval_loss"], "eval_seq_len": last["seq_len"],
                 "reached_target": bool(reached), "stop": stop, "stage": self.stage + 1,
                 "stages": len(self.plan), "time_s": self.train_time,
                 "tokens_per_s": self.tokens_seen / max(self.train_time, 1e-9), "ranks": self.size,
                 "peak_rss_mb_per_rank": rss}
        self.metrics.emit(final)
        if self.rank == 0:
            print(report.summary_text(final, self.plan), flush=True)
        return 0
