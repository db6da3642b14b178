"""The progress of a move-disk flow: its phases, one overall percent, a bar.

The flow (:mod:`vdsm_lsm.move_disk`) runs the phases below in order and
reports each phase's fraction; :class:`Progress` turns them into one overall
percent (each phase weighted), :class:`ProgressBar` shows it on a stream:
one updating line on a terminal, plain periodic lines otherwise.
:func:`mirror_detail` tells a mirror's bytes, rate and ETA, and
:class:`Convergence` whether it converges at all (the flow then restarts
it write-blocking, or warns); :func:`vm_down` why a VM that went Down
during the move did (VDSM's exit info in ``VM.getStats``).
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


MiB = 1024**2


def mirror_detail(replicate: dict[str, Any]) -> str:
    """The progress line's detail for a mirror: bytes, and the rate and ETA
    VM.getStats gives (daemons before them give none)."""
    text = f"{replicate.get('cur', 0)}/{replicate.get('end', 0)} bytes"
    if "rate" in replicate:
        text += f", {replicate['rate'] / MiB:.1f} MiB/s"
    eta = replicate.get("eta")
    if isinstance(eta, int) and replicate.get("state") != "ready":
        text += f", ETA {eta}s" if eta >= 0 else ", no ETA"
    if replicate.get("syncWrites"):
        text += ", write-blocking"
    return text


class Convergence:
    """Whether a mirror is converging, from its own successive (cur, end) readings.

    The remaining work is ``end - cur``.  A mirror not ready after ``stall``
    seconds is *not converging* when either the remaining work has not
    dropped below its best by ``min_gain`` of it over the last ``stall``
    seconds, or at the speed it shrinks since the first reading it would
    need more than ``factor`` times the time it has run already.
    """

    def __init__(
        self,
        stall: float = 30.0,
        factor: float = 4.0,
        min_gain: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall = stall
        self.factor = factor
        self.min_gain = min_gain
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self._start: tuple[float, int] | None = None  # time, remaining
        self._best: tuple[float, int] | None = None

    def update(self, cur: int, end: int) -> str:
        """Record a reading; "" while converging (or too early), else why not."""
        now = self.clock()
        remaining = max(end - cur, 0)
        if self._start is None or self._best is None:
            self._start = self._best = (now, remaining)
            return ""
        best = self._best[1]
        if remaining < best * (1 - self.min_gain) or remaining == 0:
            self._best = (now, remaining)
        elapsed = now - self._start[0]
        if elapsed < self.stall:
            return ""
        if now - self._best[0] >= self.stall:
            return (f"{remaining} bytes left, no progress in {now - self._best[0]:.0f}s")
        shrink = (self._start[1] - remaining) / elapsed
        if shrink <= 0 or remaining / shrink > self.factor * elapsed:
            return (f"{remaining} bytes left after {elapsed:.0f}s, shrinking "
                    f"{max(shrink, 0) / MiB:.2f} MiB/s")
        return ""


DOWN = "Down"


def vm_down(stats: dict[str, Any]) -> str:
    """What a VM.getStats of a VM that is Down says: "" if it is not Down,
    else its exit info in words (exitMessage, exitCode, exitReason)."""
    if stats.get("status") != DOWN:
        return ""
    message = stats.get("exitMessage") or "no reason given"
    return (f"VM {stats.get('vmId', '')} is Down: {message} (exitCode "
            f"{stats.get('exitCode', '?')}, exitReason {stats.get('exitReason', '?')})")


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
