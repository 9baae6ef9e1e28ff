"""When the validation loss has stopped improving: the plateau rule of `train`.

Given the validation losses v_0, ..., v_n at steps s_0, ..., s_n (oldest first), the
loss's noise floor f (`validation.fixed_batches`: the target half's noise power, 0
without halves) and the run's length T in steps (the learning-rate schedule's horizon:
``--steps``, or the steps ``--minutes`` allow at the measured rate), with a tenth of the
run t = T / 10:

    e_j = max(v_j - f, 1e-3 v_j)                       the excess over the floor
    b_i = least-squares slope of log e_j against s_j / t,
          over the evaluations j with s_i - W t < s_j <= s_i     (W = ``window``, tenths)

The curve has plateaued at the first evaluation i with s_i >= ``start`` T and at least
``min_evals`` evaluations in the fit where b_i > -``threshold``: the excess no longer
falls by that fraction per tenth of the run (or it rises).

Why this shape:
- per tenth of the run, because "done" is a statement about the run's length (the
  cosine schedule lowers the learning rate towards T, and the late steps improve the
  restoration at a smaller step size), and the acceptance test of the call measures
  improvement per tenth;
- a line through the logarithm over W tenths, not two points: one evaluation's loss
  scatters (fixed crops, but weights that move; `train` evaluates the running average
  of the weights, `averaging.py`, which scatters less than one step's), and the fit
  averages some dozens of them;
- not before ``start`` of the run: the loss of a young model can rise for a few tenths
  while the restoration improves (the model reorganising);
- the floor keeps the noise of the noise2noise target, which no model removes, from
  diluting the relative change.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cryowae.training.validation_config import ValidationSettings


def _log_excess(values: Sequence[float], floor: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.log(np.maximum(v - floor, 1e-3 * np.abs(v)) + 1e-30)


def _slope_at(i: int, steps: np.ndarray, log_e: np.ndarray, horizon: int,
              settings: ValidationSettings) -> float:
    """b_i (module docstring), NaN where the rule does not look yet."""
    tenth = max(float(horizon), 1.0) / 10.0
    if steps[i] < settings.start * horizon:
        return float("nan")
    m = (steps > steps[i] - settings.window * tenth) & (steps <= steps[i])
    if m.sum() < settings.min_evals:
        return float("nan")
    x = steps[m] / tenth
    return float(np.polyfit(x - x.mean(), log_e[m], 1)[0])


def excess_slopes(steps: Sequence[int], values: Sequence[float], horizon: int,
                  settings: ValidationSettings, floor: float = 0.0) -> np.ndarray:
    """b_i of the module docstring for every evaluation: the fitted change of log excess
    per tenth of a `horizon`-step run (NaN where the rule does not look yet: before
    ``start`` of the run or with fewer than ``min_evals`` evaluations in the window)."""
    s, log_e = np.asarray(steps, dtype=np.float64), _log_excess(values, floor)
    return np.array([_slope_at(i, s, log_e, horizon, settings) for i in range(len(s))])


def plateau_index(steps: Sequence[int], values: Sequence[float], horizon: int,
                  settings: ValidationSettings, floor: float = 0.0) -> int | None:
    """The first evaluation at which the curve has plateaued; None if it has not."""
    b = excess_slopes(steps, values, horizon, settings, floor)
    hits = np.flatnonzero(b > -settings.threshold)
    return int(hits[0]) if len(hits) else None


def last_slope(steps: Sequence[int], values: Sequence[float], horizon: int,
               settings: ValidationSettings, floor: float = 0.0) -> float:
    """b_i at the last evaluation (NaN where the rule does not look yet)."""
    if not len(values):
        return float("nan")
    return _slope_at(len(values) - 1, np.asarray(steps, dtype=np.float64),
                     _log_excess(values, floor), horizon, settings)


def has_plateaued(steps: Sequence[int], values: Sequence[float], horizon: int,
                  settings: ValidationSettings, floor: float = 0.0) -> bool:
    """True when the last evaluation satisfies the rule (the test a running loop makes
    once per evaluation; the horizon may have moved since the earlier ones)."""
    return bool(last_slope(steps, values, horizon, settings, floor) > -settings.threshold)


__all__ = ["excess_slopes", "has_plateaued", "last_slope", "plateau_index"]
