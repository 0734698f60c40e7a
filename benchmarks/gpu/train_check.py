"""`ringattn train --device cuda` for a few steps on several ranks sharing the GPU, then the same run
on the CPU: the two loss curves must agree (relative difference below 1e-4 at every step), as the
emulated-device tests require of CI.

    python benchmarks/gpu/train_check.py --mpiexec build/gpu-venv/bin/mpiexec --ranks 2 --steps 20 --out DIR

Writes DIR/train-cuda.jsonl and DIR/train-cpu.jsonl (the trainer's --metrics-out) and a RESULT line.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time

LOSS_TOL = 1e-4
TRAIN_FLAGS = ["--task", "needle", "--seq-len", "1024", "--batch", "4", "--curriculum", "none",
               "--width", "64", "--layers", "2", "--heads", "2", "--log-interval", "1", "--eval-size", "16",
               "--target-accuracy", "0", "--check-interval", "10", "--no-progress", "--seed", "0"]


def run(cmd, timeout, env):
    """(exit status, seconds); the whole process group is killed on timeout (status 124)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"timed out after {timeout:.0f} s", flush=True)
        rc = 124
    return rc, time.perf_counter() - t0


def losses(path):
    """{step: loss} of the logged steps in a metrics file."""
    out = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                obj = json.loads(line)
                if "loss" in obj and "step" in obj and not obj.get("final"):
                    out[obj["step"]] = obj["loss"]
    return out


def final(path):
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                obj = json.loads(line)
                if obj.get("final"):
                    return obj
    return {}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--mpiexec", default="mpiexec")
    p.add_argument("--mpiexec-flags", default="", help="extra mpiexec arguments, one string")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--time-left", type=float, default=55.0, help="seconds for both runs together")
    a = p.parse_args(argv)
    deadline = time.monotonic() + a.time_left
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    curves, times, rcs = {}, {}, {}
    for dev in ("cuda", "cpu"):
        metrics = os.path.join(a.out, f"train-{dev}.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)
        cmd = [a.mpiexec, *shlex.split(a.mpiexec_flags), "-n", str(a.ranks), sys.executable, "-m", "mpi4py", "-m",
               "ringattn", "train", *TRAIN_FLAGS, "--steps", str(a.steps), "--sp", str(a.ranks), "--device", dev,
               "--metrics-out", metrics]
        rcs[dev], times[dev] = run(cmd, deadline - time.monotonic(), env)
        curves[dev] = losses(metrics)
    problems = [f"train --device {d} exited {rc}" for d, rc in rcs.items() if rc != 0]
    steps = sorted(curves["cuda"])
    if len(steps) != a.steps or steps != sorted(curves["cpu"]):
        problems.append(f"logged steps: cuda {len(curves['cuda'])}, cpu {len(curves['cpu'])}, expected {a.steps} each")
    diffs = [abs(curves["cuda"][s] - curves["cpu"][s]) / max(abs(curves["cpu"][s]), 1e-12)
             for s in steps if s in curves["cpu"]]
    worst = max(diffs) if diffs else None
    if worst is None or not worst < LOSS_TOL:
        problems.append(f"loss curves differ: max relative difference {worst} (bound {LOSS_TOL:g})")
    fin = final(os.path.join(a.out, "train-cuda.jsonl"))
    print(f"# train {a.ranks} ranks x {a.steps} steps: cuda {times['cuda']:.1f} s, cpu {times['cpu']:.1f} s, "
          f"max relative loss difference {worst}")
    for msg in problems:
        print("FAIL " + msg)
    print("RESULT " + json.dumps({
        "train_ranks": a.ranks, "train_steps": len(steps), "train_cuda_s": round(times["cuda"], 2),
        "train_cpu_s": round(times["cpu"], 2), "train_max_rel_loss_diff": worst,
        "train_loss_first": curves["cuda"].get(steps[0]) if steps else None,
        "train_loss_last": curves["cuda"].get(steps[-1]) if steps else None,
        "train_cuda_tokens_per_s": fin.get("tokens_per_s")}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
