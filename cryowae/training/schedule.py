"""The learning-rate schedule of `cryowae train` and the clock that fits it to a time
budget.

    lr(step) = lr0 (step + 1) / warm                                  step < warm
             = lr0 (0.1 + 0.45 (1 + cos(pi (step - warm) / (T - warm))))  after

T, the schedule's horizon, is ``--steps``; with ``--minutes`` it is the step at which
the budget runs out at the mean step time measured so far (`budget_horizon`),
re-estimated after every step from the third on (`RunClock.after_step`): the first step
also warms up and is not timed, and one early estimate was often 30 % off, ending the
cosine long before the budget or cutting it off mid-way. Times are wall-clock seconds.
"""

from __future__ import annotations

import math
import time


def learning_rate(step: int, total_steps: int, lr: float, warm: int = 10) -> float:
    """Linear warm-up over `warm` steps, then a cosine decay to 0.1 lr at `total_steps`."""
    if step < warm:
        return lr * (step + 1) / warm
    frac = min(1.0, (step - warm) / max(1, total_steps - warm))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def budget_horizon(step: int, max_steps: int, left_s: float, per_step_s: float) -> int:
    """The step at which a time budget runs out: `step` plus the steps of `per_step_s`
    seconds that fit in the `left_s` seconds left, at most `max_steps`."""
    return min(max_steps, step + int(max(0.0, left_s) / max(per_step_s, 1e-9)))


class RunClock:
    """Elapsed time, throughput and the schedule's horizon of one (possibly resumed) run.

    Parameters
    ----------
    budget_s
        The time budget in seconds (``--minutes`` x 60), or None.
    elapsed_s
        Seconds spent by the run before this process (a resumed run's), counted against
        the budget.
    step
        The step this process starts at.
    batch_size
        Subtomograms per step (for the throughput).
    """

    def __init__(self, budget_s: float | None, elapsed_s: float, step: int,
                 batch_size: int) -> None:
        self.budget_s = budget_s
        self.batch_size = int(batch_size)
        self.start_step = int(step)
        now = time.perf_counter()
        self._t_start = now - float(elapsed_s)
        self._t_run = self._t_first = now
        self.elapsed_s = float(elapsed_s)

    def after_step(self, step: int, max_steps: int) -> tuple[float, int]:
        """After `step` (the step count now): the throughput of this process in
        subtomograms per second, and the schedule's new horizon (module docstring;
        -1 when there is no budget or fewer than 3 steps were made here)."""
        now = time.perf_counter()
        self.elapsed_s = now - self._t_start
        done = step - self.start_step
        rate = done * self.batch_size / max(now - self._t_run, 1e-9)
        if done == 1:
            self._t_first = now  # the first step also warms up: not timed
        if self.budget_s is None or done < 3:
            return rate, -1
        return rate, budget_horizon(step, max_steps, self.budget_s - self.elapsed_s,
                                    (now - self._t_first) / (done - 1))

    @property
    def spent(self) -> bool:
        """Whether the budget (if any) is used up."""
        return self.budget_s is not None and self.elapsed_s >= self.budget_s


__all__ = ["RunClock", "budget_horizon", "learning_rate"]
