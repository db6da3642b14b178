"""The progress of a move (vdsm_lsm/move_progress.py): one weighted percent, a bar."""

from __future__ import annotations

import io

from vdsm_lsm import move_progress


def test_progress_weights_phases_into_one_percent():
    p = move_progress.Progress(["a", "b", "c"], {"a": 10, "b": 30, "c": 60})
    assert p.percent("a") == 0
    assert p.percent("a", 0.5) == 5
    assert p.percent("b") == 10
    assert p.percent("b", 1.0) == 40
    assert p.percent("c", 0.5) == 70
    assert p.percent(move_progress.DONE) == 100


def test_progress_never_goes_back_and_clamps_fractions():
    p = move_progress.Progress(["a", "b"], {"a": 50, "b": 50})
    assert p.percent("b", 0.8) == 90
    assert p.percent("b", 0.2) == 90  # a mirror's cur/end fell back: keep the best
    assert p.percent("b", 7.0) == 100
    q = move_progress.Progress(["a", "b"], {"a": 50, "b": 50})
    assert q.percent("a", -1.0) == 0


def test_mirror_fraction_from_replicate_stats():
    assert move_progress.mirror_fraction({"state": "copying", "cur": 0, "end": 0}) == 0
    assert move_progress.mirror_fraction({"state": "copying", "cur": 25, "end": 100}) == 0.25
    assert move_progress.mirror_fraction({"state": "ready", "cur": 99, "end": 100}) == 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_writes_plain_lines_when_not_a_tty():
    out, clock = io.StringIO(), Clock()
    bar = move_progress.ProgressBar(out, tty=False, step=10, interval=5, clock=clock)
    bar.update(0, "sync")
    bar.update(3, "sync")  # small move, too soon: no line
    clock.now = 6
    bar.update(4, "sync")  # small move, but a while since the last line
    bar.update(20, "sync")  # a big move
    bar.update(20, "mirror")  # a new phase always shows
    bar.update(100, move_progress.DONE)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[1] for line in lines] == [
        "  0.0% sync", "  4.0% sync", " 20.0% sync", " 20.0% mirror", "100.0% done"]
    assert "\r" not in out.getvalue()


def test_progress_bar_redraws_one_line_on_a_tty():
    out = io.StringIO()
    bar = move_progress.ProgressBar(out, tty=True)
    bar.update(0, "snapshot")
    bar.update(50, "sync", "syncData")
    bar.update(50, "sync", "syncData")  # unchanged: not redrawn
    bar.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    assert "[" + "#" * 15 + "-" * 15 + "]  50.0% sync syncData" in text


def test_convergence_of_a_mirror_that_gets_there():
    clock = Clock()
    watch = move_progress.Convergence(stall=10, clock=clock)
    remaining = 100
    for _ in range(30):
        assert watch.update(100 - remaining, 100) == ""
        clock.now += 1
        remaining -= 3


def test_a_mirror_without_progress_is_not_converging_after_the_stall():
    clock = Clock()
    watch = move_progress.Convergence(stall=10, clock=clock)
    verdicts = []
    for i in range(15):
        # cur and end both move on: end - cur stays 50 MiB.
        verdicts.append(watch.update(i * 2**20, (i + 50) * 2**20))
        clock.now += 1
    assert verdicts[:10] == [""] * 10
    assert "no progress" in verdicts[-1]
    watch.reset()
    assert watch.update(0, 100) == ""


def test_a_mirror_too_slow_for_its_elapsed_time_is_not_converging():
    clock = Clock()
    watch = move_progress.Convergence(stall=10, factor=4, min_gain=0.001, clock=clock)
    verdict = ""
    for i in range(12):
        # 1000 MiB to go, shrinking by 2 MiB/s: ~500 s more after 11 s.
        verdict = watch.update(0, (1000 - 2 * i) * 2**20)
        clock.now += 1
    assert "shrinking" in verdict


def test_mirror_detail_shows_rate_eta_and_mode():
    rep = {"state": "copying", "cur": 5, "end": 10, "rate": 3 * 2**20, "eta": 7}
    assert move_progress.mirror_detail(rep) == "5/10 bytes, 3.0 MiB/s, ETA 7s"
    rep.update(eta=-1, syncWrites=True)
    assert move_progress.mirror_detail(rep).endswith("no ETA, write-blocking")
    # A daemon without rate/eta.
    assert move_progress.mirror_detail({"state": "ready", "cur": 1, "end": 1}) == "1/1 bytes"
