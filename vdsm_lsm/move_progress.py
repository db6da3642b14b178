"""The progress of a move-disk flow: its phases, one overall percent, a bar.

The flow (:mod:`vdsm_lsm.move_disk`) runs the phases below in order and
reports each phase's fraction; :class:`Progress` turns them into one overall
percent (each phase weighted), :class:`ProgressBar` shows it on a stream:
one updating line on a terminal, plain periodic lines otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

# Phases of the flow and their weights in the overall percent.
SNAPSHOT = "snapshot"
CLONE = "clone"
REPLICATE = "replicate"
SYNC = "sync"
MIRROR = "mirror"
PIVOT = "pivot"
DELETE = "delete-source"
DONE = "done"

# The phases every move runs, in order; DELETE follows them when the source is deleted.
PHASES = (SNAPSHOT, CLONE, REPLICATE, SYNC, MIRROR, PIVOT)

WEIGHTS = {SNAPSHOT: 5, CLONE: 10, REPLICATE: 5, SYNC: 40, MIRROR: 30, PIVOT: 5, DELETE: 5}


class Progress:
    """The overall percent of a move from the current phase and its fraction.

    Phases run in the order given; a phase's share of 100 is its weight over
    the total.  The percent never goes back (a mirror's cur/end may).
    """

    def __init__(self, phases: list[str], weights: dict[str, int] | None = None) -> None:
        weights = WEIGHTS if weights is None else weights
        self.phases = list(phases)
        self.weights = {p: weights[p] for p in self.phases}
        self.total = sum(self.weights.values())
        self.best = 0.0

    def percent(self, phase: str, fraction: float = 0.0) -> float:
        if phase == DONE:
            value = 100.0
        else:
            done = sum(self.weights[p] for p in self.phases[: self.phases.index(phase)])
            fraction = min(max(fraction, 0.0), 1.0)
            value = 100.0 * (done + self.weights[phase] * fraction) / self.total
        self.best = max(self.best, value)
        return self.best


def mirror_fraction(replicate: dict[str, Any]) -> float:
    """How far a mirror is from ready, from VM.getStats' ``replicate``."""
    if replicate.get("state") == "ready":
        return 1.0
    end = replicate.get("end") or 0
    return (replicate.get("cur") or 0) / end if end > 0 else 0.0


class ProgressBar:
    """Shows (percent, phase) on a stream.

    On a terminal one line is redrawn in place; otherwise a line is written
    when the phase changes or the percent has moved ``step`` since the last
    line, at most every ``interval`` seconds within a phase.
    """

    WIDTH = 30

    def __init__(
        self,
        stream: TextIO | None = None,
        tty: bool | None = None,
        step: float = 10.0,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty() if tty is None else tty
        self.step = step
        self.interval = interval
        self.clock = clock
        self._last: tuple[float, str, str] | None = None  # percent, phase, detail
        self._last_time = 0.0
        self._open = False

    def render(self, percent: float, phase: str, detail: str = "") -> str:
        filled = int(self.WIDTH * percent / 100)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        text = f"[{bar}] {percent:5.1f}% {phase}"
        return f"{text} {detail}" if detail else text

    def update(self, percent: float, phase: str, detail: str = "") -> None:
        now = self.clock()
        last = self._last
        if self.tty:
            if last == (percent, phase, detail):
                return
            self.stream.write("\r\x1b[K" + self.render(percent, phase, detail))
            self._open = True
        else:
            if last is not None and last[1] == phase:
                moved = percent - last[0]
                if moved < self.step and (moved <= 0 or now - self._last_time < self.interval):
                    return
            self.stream.write(self.render(percent, phase, detail) + "\n")
        self.stream.flush()
        self._last = (percent, phase, detail)
        self._last_time = now

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
