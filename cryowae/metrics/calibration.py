"""Calibration of posterior samples: how often the truth lies in the predicted interval.

For each voxel the central interval of probability `level` is taken from the samples'
empirical quantiles ``(1 - level) / 2`` and ``(1 + level) / 2`` (linear interpolation
between order statistics, numpy's default). A calibrated sampler puts the ground truth
inside it for a fraction ``level`` of the voxels; fewer means over-confident samples,
more means under-confident ones. With S samples the expected coverage of an exactly
calibrated sampler is slightly below `level` (about ``level * (S - 1) / (S + 1)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor

#: Z slices sorted at a time (bounds the memory of the per-voxel sort)
_SLAB = 8


def interval_coverage(samples: Any, gt: Any, levels: Sequence[float] = (0.5, 0.9),
                      ) -> dict[float, float]:
    """Fraction of ground-truth voxels inside the samples' central intervals.

    Parameters
    ----------
    samples
        (S, Z, Y, X) posterior samples, S >= 2 (torch tensor, numpy array or memmap;
        read one Z slab at a time).
    gt
        (Z, Y, X) ground truth, same intensity scale as the samples.
    levels
        Interval probabilities, each in (0, 1).

    Returns
    -------
    dict
        level -> fraction of voxels with ``q_lo <= gt <= q_hi`` (a float in [0, 1]).
    """
    levels = [float(lv) for lv in levels]
    for lv in levels:
        if not 0.0 < lv < 1.0:
            raise CryowaeInputError(f"interval level {lv:g} is not in (0, 1)")
    shape = tuple(int(s) for s in np.shape(samples))
    g = as_tensor(gt, "gt")
    if len(shape) != 4 or shape[1:] != tuple(g.shape):
        raise CryowaeInputError(f"samples must be (S, Z, Y, X) with (Z, Y, X) = "
                                f"{tuple(g.shape)} of the ground truth, got {shape}")
    n_samples = shape[0]
    if n_samples < 2:
        raise CryowaeInputError(f"need at least 2 samples for an interval, got {n_samples}")
    inside = dict.fromkeys(levels, 0)
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples")
        srt, _ = torch.sort(block, dim=0)
        truth = g[z:z + _SLAB].to(srt.device)
        for lv in levels:
            lo = _quantile_sorted(srt, (1.0 - lv) / 2.0)
            hi = _quantile_sorted(srt, (1.0 + lv) / 2.0)
            inside[lv] += int(((truth >= lo) & (truth <= hi)).sum())
    total = int(np.prod(shape[1:]))
    return {lv: inside[lv] / total for lv in levels}


def _quantile_sorted(srt: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile `q` along dim 0 of an already sorted tensor (linear interpolation)."""
    pos = q * (srt.shape[0] - 1)
    i = int(np.floor(pos))
    j = min(i + 1, srt.shape[0] - 1)
    frac = pos - i
    return srt[i] * (1.0 - frac) + srt[j] * frac
