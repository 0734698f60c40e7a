"""summary.json of a benchmarks/gpu/run.sh run, from the steps.tsv the runner wrote and each step's
log (the numbers a step reports are its lines "RESULT {json}"; pytest counts come from its last line).

    python3 benchmarks/gpu/summary.py OUT_DIR --mode run --card NAME --started T --budget S ...

Exit status: 0 when no step failed, 1 otherwise. Standard library only (runs before any venv exists).
"""
import argparse
import json
import os
import re
import sys

FIELDS = ("name", "status", "rc", "seconds", "timeout_s", "note")
PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def results(text):
    """The merged objects of the RESULT lines in a step's output (later keys win)."""
    numbers = {}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            try:
                obj = json.loads(line[len("RESULT "):])
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                numbers.update(obj)
    return numbers


def pytest_counts(text):
    """{'passed': n, ...} from pytest's final summary line, if the text has one."""
    for line in reversed(text.splitlines()):
        if re.search(r"\bin [0-9.]+s\b", line) and PYTEST_COUNT.search(line):
            return {k if k != "error" else "errors": int(n) for n, k in PYTEST_COUNT.findall(line)}
    return {}


def as_int(s):
    try:
        return int(s)
    except ValueError:
        return None


def read_steps(out):
    steps = []
    path = os.path.join(out, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < len(FIELDS):
                parts += [""] * (len(FIELDS) - len(parts))
            step = dict(zip(FIELDS, parts))
            step["rc"] = as_int(step["rc"])
            step["seconds"], step["timeout_s"] = as_int(step["seconds"]), as_int(step["timeout_s"])
            log = os.path.join(out, "steps", step["name"] + ".log")
            step["log"] = os.path.relpath(log, out) if os.path.exists(log) else None
            text = open(log, errors="replace").read() if step["log"] else ""
            step["numbers"] = results(text)
            if step["name"] == "gpu-tests":
                step["numbers"].update(pytest_counts(text))
            steps.append(step)
    return steps


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--mode", default="run")
    p.add_argument("--card", default="")
    p.add_argument("--started", default="")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--timeouts-total", type=int, default=0)
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--git", default="")
    a = p.parse_args(argv)
    steps = read_steps(a.out)
    failed = [s["name"] for s in steps if s["status"] == "failed"]
    summary = {
        "script": "benchmarks/gpu/run.sh", "mode": a.mode, "card": a.card or None, "started": a.started,
        "git": a.git, "seconds": a.seconds, "budget_s": a.budget, "timeouts_total_s": a.timeouts_total,
        "ok": not failed and any(s["status"] == "passed" for s in steps), "failed": failed,
        "counts": {k: sum(s["status"] == k for s in steps) for k in ("passed", "failed", "skipped")},
        "steps": steps,
    }
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    print(f"[gpu] {summary['counts']['passed']} passed, {summary['counts']['failed']} failed, "
          f"{summary['counts']['skipped']} skipped in {a.seconds} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if summary["ok"] or (a.mode == "dry-run" and not failed) else 1  # a dry run passes nothing


if __name__ == "__main__":
    sys.exit(main())
