"""ringattn.progress: the plain-line form (what logs read when tqdm is missing or --no-progress) and
the inactive form (ranks other than 0) of the one progress display."""
import sys

from ringattn.progress import Progress


def test_plain_lines_for_trainer_updates(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import fails: plain lines
    bar = Progress(10, initial=3)
    assert bar.bar is None
    bar.update(4, {"loss": "0.6931", "acc": "0.500"})
    bar.write("held-out accuracy 0.5")
    bar.start("next")
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["step 4: loss 0.6931 acc 0.500", "held-out accuracy 0.5",
                                                    "[5/10] next ..."]


def test_plain_flag_skips_tqdm_even_when_installed(monkeypatch, capsys):
    class Boom:
        def __init__(self, *a, **k):
            raise AssertionError("tqdm used although plain=True")

    monkeypatch.setitem(sys.modules, "tqdm", type(sys)("tqdm"))
    sys.modules["tqdm"].tqdm = Boom
    bar = Progress(2, plain=True)
    bar.start("a")
    assert capsys.readouterr().err == "[1/2] a ...\n"


def test_inactive_prints_nothing(capsys):
    bar = Progress(2, active=False)
    bar.start("a"); bar.step(); bar.update(1, {"loss": "1"}); bar.write("x"); bar.close()
    assert bar.bar is None and capsys.readouterr().err == ""
