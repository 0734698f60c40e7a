"""The needle task's default recipe (docs/training.md, "Defaults"): the stages each final length gets."""
import argparse

from ringattn import train as T


def plan_for(world, *argv):
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    _, plan = T.validate(p.parse_args(list(argv)), world)
    return [(ln, b, sp) for ln, b, sp, _ in plan]


def test_main_job_plan_ends_512_then_2048():
    assert plan_for(4) == [(12, 1024, 1), (32, 512, 1), (128, 128, 1), (512, 32, 2), (2048, 16, 4)]


def test_longer_runs_get_a_2048_stage_before_their_length():
    base = [(12, 1024, 1), (32, 512, 1), (128, 128, 1), (512, 32, 2), (2048, 16, 4)]
    assert plan_for(4, "--seq-len", "4096") == base + [(4096, 16, 4)]
    assert plan_for(4, "--seq-len", "8192") == base + [(8192, 16, 4)]
    # shorter final lengths drop the stages not shorter than them
    assert plan_for(4, "--seq-len", "1024") == base[:4] + [(1024, 16, 4)]
    assert plan_for(4, "--seq-len", "512") == base[:3] + [(512, 16, 2)]
    # an explicit --batch still caps every default stage
    assert plan_for(4, "--seq-len", "4096", "--batch", "8")[-2:] == [(2048, 8, 4), (4096, 8, 4)]
