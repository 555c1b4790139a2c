"""The progress line of prepare and submit: images/s and an ETA while running."""

from __future__ import annotations

import io

from tfpneumo import progress
from tfpneumo.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_duration_reads_like_a_clock():
    assert [duration(s) for s in (0.4, 42, 65, 425, 3600, 3725.0)] == [
        "0 s", "42 s", "1 min 05 s", "7 min 05 s", "1 h 00 min", "1 h 02 min"]


def test_the_line_has_the_rate_after_the_first_update_and_an_eta(monkeypatch):
    clock, err = Clock(), Tty()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setattr(progress.sys, "stderr", err)
    bar = Progress("submit sub.csv", 100, True)
    clock.now += 30.0  # start-up: networks loaded, graph traced
    bar.update(2)
    assert err.getvalue().endswith("2/100 images, 0.07 img/s, 30.0 s\x1b[K")  # no rate yet
    clock.now += 4.0
    bar.update(2)  # 2 images in 4 s: 0.5 img/s, 96 left -> 192 s
    assert err.getvalue().endswith("4/100 images, 0.50 img/s, 34.0 s, ETA 3 min 12 s\x1b[K")
    clock.now += 1.0
    bar.close()  # the final line: the whole run's rate, no ETA
    assert err.getvalue().endswith("\rsubmit sub.csv: 4/100 images, 0.11 img/s, 35.0 s\x1b[K\n")


def test_off_a_tty_a_line_a_minute(monkeypatch):
    clock, err = Clock(), io.StringIO()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setattr(progress.sys, "stderr", err)
    bar = Progress("submit sub.csv", 10, True)
    for _ in range(3):
        clock.now += 25.0
        bar.update(1)
    assert err.getvalue() == "submit sub.csv: 3/10 images, 0.04 img/s, 75.0 s, ETA 2 min 55 s\n"
    bar.close()
    assert err.getvalue().count("\n") == 2 and "ETA" not in err.getvalue().splitlines()[-1]
