"""The one small progress interface every long loop in cryowae reports through.

The library calls `start`, `advance` and `finish`, and polls `cancelled` to stop early.
The CLI draws it with rich (`cryowae.cli.progress.RichProgress`), the napari plugin with
napari's progress bar; `NullProgress` ignores everything.

The remaining time is computed here, not by the drawing (`EtaClock`): from the rate of
the units done in this session (units finished before a resume do not count as speed),
and, when the task has a wall-clock budget (`train --minutes`), from what is left of
that budget; the smaller of the two is the estimate.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from cryowae.errors import CryowaeInputError


class Cancelled(CryowaeInputError):
    """The user cancelled a long task through `ProgressReporter.cancel`; no output was
    written (checkpoints and finished blocks, where a task keeps them, stay)."""


class EtaClock:
    """Remaining time (seconds) of a task of `total` units.

    Times are seconds on one monotonic clock (`time.monotonic` unless given). The rate
    is the units per second over the samples of the last `window_s` seconds (at least
    the last two samples: the start and every advance are samples), so a slow start
    stops weighing once later units are in. With a budget
    (`set_budget`), the time left is ``budget_s - spent_s - (now - t0)``: the task stops
    when its budget is spent, whatever its unit total says.
    """

    def __init__(self, total: int, done: int = 0, now: float | None = None,
                 window_s: float = 30.0) -> None:
        t = time.monotonic() if now is None else float(now)
        self.total, self.t0, self.window_s = int(total), t, float(window_s)
        self.budget_s: float | None = None
        self.spent_s = 0.0
        self.samples: deque[tuple[float, int]] = deque([(t, int(done))])

    def set_budget(self, budget_s: float | None, spent_s: float = 0.0) -> None:
        """A wall-clock budget of `budget_s` seconds for the whole task, `spent_s` of
        which were spent before this session (a resumed run); None: no budget."""
        self.budget_s = None if budget_s is None else float(budget_s)
        self.spent_s = float(spent_s)

    def record(self, done: int, now: float | None = None) -> None:
        """`done` units are finished at time `now`."""
        t = time.monotonic() if now is None else float(now)
        self.samples.append((t, int(done)))
        while len(self.samples) > 2 and self.samples[1][0] < t - self.window_s:
            self.samples.popleft()

    @property
    def done(self) -> int:
        return self.samples[-1][1]

    def rate(self) -> float | None:
        """Units per second over the window; None before the first advance. Once two
        advances are in, the start sample is left out: the first unit's warm-up (model
        loading, first batches) is not the pace of the others."""
        first = 1 if len(self.samples) >= 3 and self.samples[0][0] == self.t0 else 0
        (t_a, d_a), (t_b, d_b) = self.samples[first], self.samples[-1]
        if d_b <= d_a or t_b <= t_a:
            return None
        return (d_b - d_a) / (t_b - t_a)

    def units_left_s(self, now: float | None = None) -> float | None:
        """Seconds until the unit total is reached at the current rate (None: unknown)."""
        t = time.monotonic() if now is None else float(now)
        rate = self.rate()
        if self.done >= self.total:
            return 0.0
        if rate is None:
            return None
        return max(0.0, (self.total - self.done) / rate - (t - self.samples[-1][0]))

    def budget_left_s(self, now: float | None = None) -> float | None:
        """Seconds left of the budget (None without a budget)."""
        if self.budget_s is None:
            return None
        t = time.monotonic() if now is None else float(now)
        return max(0.0, self.budget_s - self.spent_s - (t - self.t0))

    def time_bound(self, now: float | None = None) -> bool:
        """True when the budget, not the unit total, ends the task (as far as known)."""
        budget = self.budget_left_s(now)
        if budget is None:
            return False
        units = self.units_left_s(now)
        return units is None or budget < units

    def remaining(self, now: float | None = None) -> float | None:
        """Estimated seconds left: the smaller of the unit estimate and the budget left;
        None when neither is known yet."""
        known = [v for v in (self.units_left_s(now), self.budget_left_s(now)) if v is not None]
        return min(known) if known else None

    def fraction(self, now: float | None = None) -> float:
        """How far the task is, in [0, 1]: by time when the budget binds, else by units."""
        if self.time_bound(now) and self.budget_s:
            t = time.monotonic() if now is None else float(now)
            return min(1.0, (self.spent_s + t - self.t0) / self.budget_s)
        return min(1.0, self.done / self.total) if self.total > 0 else 0.0


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``-:--`` when unknown."""
    if seconds is None:
        return "-:--"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressReporter:
    """Base reporter: records state, draws nothing. Subclass to draw."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.description = ""
        self.info: dict[str, Any] = {}
        self.cancelled = False
        self.clock = EtaClock(0)

    def start(self, total: int, description: str = "", done: int = 0) -> None:
        """Begin a task of `total` units, `done` of which are finished (on resume)."""
        self.total, self.done, self.description = int(total), int(done), description
        self.clock = EtaClock(self.total, self.done)

    def set_time_budget(self, budget_s: float | None, spent_s: float = 0.0) -> None:
        """The task started by `start` also stops when `budget_s` seconds of wall-clock
        time are spent (`spent_s` of them before this session): its remaining time and
        fraction count that budget."""
        self.clock.set_budget(budget_s, spent_s)

    def advance(self, n: int = 1, **info: Any) -> None:
        """`n` more units are finished; `info` holds figures to show (loss terms...)."""
        self.done += n
        self.info.update(info)
        self.clock.record(self.done)

    def eta(self, now: float | None = None) -> float | None:
        """Estimated seconds left (`EtaClock.remaining`); None when unknown."""
        return self.clock.remaining(now)

    def log(self, message: str) -> None:
        """A one-line message for the user (the mode a run uses, a fallback taken...)."""

    def finish(self) -> None:
        """The task is over (done or stopped)."""

    def cancel(self) -> None:
        """Ask the running loop to stop at its next check."""
        self.cancelled = True

    def check_cancelled(self, what: str = "task") -> None:
        """Raise `Cancelled` if `cancel` was called: the one check every loop makes."""
        if self.cancelled:
            raise Cancelled(f"{what} cancelled; no output was written")


class NullProgress(ProgressReporter):
    """Reports nowhere."""


def ensure_progress(progress: ProgressReporter | None) -> ProgressReporter:
    return progress if progress is not None else NullProgress()
