"""When the validation loss has stopped improving: the plateau rule of `train`.

Given the validation losses v_0, ..., v_n (one per evaluation, oldest first) and the
loss's noise floor f (`validation.fixed_batches`: the target half's noise power, 0
without halves):

    s_i = median(v_{i-h+1}, ..., v_i)           (h = ``smooth``; fewer at the start)
    r_i = (s_{i-w} - s_i) / |s_{i-w} - f|       (w = ``window``)

The curve has plateaued at the first evaluation i >= ``min_evals`` - 1 with
r_i < ``threshold``: the smoothed loss's excess over its floor improved by less than
that fraction over the last w evaluations. The running median makes one odd
evaluation (a spike or a dip) change nothing; the relative improvement makes the rule
independent of the loss's scale (intensity units, wedge weight, patch size); the floor
keeps the noise of the noise2noise target, which no model removes, from diluting it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cryowae.training.validation_config import ValidationSettings


def smoothed(values: Sequence[float], width: int) -> np.ndarray:
    """Running median of `values` over the last `width` entries (fewer at the start)."""
    v = np.asarray(values, dtype=np.float64)
    return np.array([np.median(v[max(0, i - width + 1):i + 1]) for i in range(len(v))])


def relative_improvement(values: Sequence[float], settings: ValidationSettings,
                         floor: float = 0.0) -> np.ndarray:
    """r_i of the module docstring for every evaluation (NaN where i < window)."""
    s = smoothed(values, settings.smooth)
    w = settings.window
    r = np.full(len(s), np.nan)
    if len(s) > w:
        r[w:] = (s[:-w] - s[w:]) / np.maximum(np.abs(s[:-w] - floor), 1e-30)
    return r


def plateau_index(values: Sequence[float], settings: ValidationSettings,
                  floor: float = 0.0) -> int | None:
    """The first evaluation at which the curve has plateaued; None if it has not."""
    r = relative_improvement(values, settings, floor)
    for i in range(settings.min_evals - 1, len(r)):
        if r[i] < settings.threshold:
            return i
    return None


def has_plateaued(values: Sequence[float], settings: ValidationSettings,
                  floor: float = 0.0) -> bool:
    """True when the last evaluation satisfies the rule (the test a running loop
    makes once per evaluation)."""
    n = len(values)
    if n < settings.min_evals:
        return False
    r = relative_improvement(values, settings, floor)
    return bool(r[-1] < settings.threshold)


__all__ = ["has_plateaued", "plateau_index", "relative_improvement", "smoothed"]
