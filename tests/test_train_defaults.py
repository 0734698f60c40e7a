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


def args_after_validate(world, *argv):
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    a = p.parse_args(list(argv))
    T.validate(a, world)
    return a


def test_needle_schedule_and_stage_budget():
    a = args_after_validate(4)
    assert (a.steps, a.warmup) == (3000, 100)
    _, plan = T.validate(a, 4)  # the stages before 2048 share the first half of the 3000 steps
    assert [until for *_, until in plan] == [375, 750, 1125, 1500, None]
    a = args_after_validate(4, "--steps", "500")  # an explicit --steps: min(100, steps // 10) warm-up
    assert (a.steps, a.warmup) == (500, 50)
    a = args_after_validate(4, "--warmup", "7")
    assert (a.steps, a.warmup) == (3000, 7)


def test_decay_steps_flag_default_and_run_config():
    a = args_after_validate(4)
    assert a.decay_steps == 400 and T.flags.run_config(a)["decay_steps"] == 400  # needle's default
    assert args_after_validate(4, "--task", "synthetic").decay_steps == 0  # other tasks: off
    # older checkpoints (no decay_steps key) read as 0
    assert T.flags.RUN_CONFIG_ADDED["decay_steps"] == 0
    a = args_after_validate(4, "--decay-steps", "0")
    assert a.decay_steps == 0 and T.flags.run_config(a)["decay_steps"] == 0
    a = args_after_validate(4, "--decay-steps", "400")
    assert a.decay_steps == 400 and T.flags.run_config(a)["decay_steps"] == 400
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    try:
        T.validate(p.parse_args(["--decay-steps", "-1"]), 4)
    except T.UsageError as e:
        assert "--decay-steps must be >= 0" in str(e)
    else:
        raise AssertionError("negative --decay-steps accepted")


def test_local_window_default_flag_and_run_config():
    a = args_after_validate(4)
    assert a.local_window == 8 and T.flags.run_config(a)["local_window"] == 8  # needle's default
    a = args_after_validate(4, "--local-window", "none")
    assert a.local_window == -1 and T.flags.run_config(a)["local_window"] == -1
    assert T.flags.RUN_CONFIG_ADDED["local_window"] == -1  # older checkpoints: every layer alike
    a = args_after_validate(4, "--local-window", "3", "--layers", "1")  # one layer is always global
    assert a.local_window == 3 and T.flags.run_config(a)["local_window"] == -1
    a = args_after_validate(4, "--task", "synthetic")
    assert a.local_window == -1  # other tasks: none
    p = argparse.ArgumentParser()
    T.add_arguments(p)
    for bad in ("-1", "x", "2.5"):
        try:
            p.parse_args(["--local-window", bad])
        except SystemExit:
            pass
        else:
            raise AssertionError(f"--local-window {bad} accepted")
