"""Per-voxel calibration of a family's spread: range counts and the reliability of
its standard-deviation map (ENCE).

A family is S samples X_1..X_S (S, Z, Y, X) of one tomogram, y the (Z, Y, X) truth on
the samples' intensity scale. Per voxel, Xbar is the family mean and s the unbiased
sample standard deviation (divisor S - 1).

Outside the range (`outside_range_fraction`). If y and the S samples are exchangeable
(y is one more draw of the family's distribution, whatever that distribution is), y is
the smallest or the largest of the S + 1 values with probability 2 / (S + 1), so the
fraction of voxels whose truth lies outside [min_s X_s, max_s X_s] is 2 / (S + 1) for a
calibrated family (ties have probability 0 for continuous values). Above it: too
narrow or biased; below: too wide.

Predicted error of the family mean (`predicted_std`). For a truth drawn from the same
distribution as the samples (variance sigma^2), Xbar - y has variance
sigma^2 / S + sigma^2, so the family predicts ``sigma_pred = s sqrt((S + 1) / S)`` for
the error of its own mean (the factor of `spread_skill`).

ENCE (`reliability`), the expected normalized calibration error (Levi et al. 2022,
"Evaluating and calibrating uncertainty prediction in regression tasks"): voxels are
split into `n_bins` bins of equal count by their predicted std; in bin b,
``RMV_b = sqrt(mean sigma_pred^2)`` (root mean variance) and ``RMSE_b =
sqrt(mean (Xbar - y)^2)``, and

    ENCE = (1 / B) sum_b |RMV_b - RMSE_b| / RMV_b.

0 is perfect; a family whose spread is c times the right one reads about |c - 1| / c
(0.5 at c = 2, 1 at c = 0.5). Because the bins are chosen by the *estimated* s, the
highest bins hold voxels whose s came out high by chance and read RMV > RMSE (the
lowest the reverse), so an exact family reads a little above 0, the more so the smaller
S and the narrower the range of the true sigma across voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.metrics.calibration import check_family

#: Z slices of the family read at a time
_SLAB = 8
#: std-quantile bins of the ENCE and the reliability diagram
ENCE_BINS = 10


def outside_range_fraction(samples: Any, truth: Any) -> dict[str, float]:
    """Fraction of voxels whose truth lies strictly outside [min, max] of the samples,
    with its value for a calibrated family (module docstring).

    Parameters
    ----------
    samples
        (S, Z, Y, X) family, S >= 2 (tensor, array or memmap; read one Z slab at a time).
    truth
        (Z, Y, X) ground truth on the samples' intensity scale.

    Returns
    -------
    dict
        ``fraction`` (in [0, 1]) and ``ideal`` = 2 / (S + 1).
    """
    g = as_tensor(truth, "truth")
    shape = tuple(int(v) for v in np.shape(samples))
    s = check_family(shape, tuple(g.shape))
    outside = 0
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples")
        t = g[z:z + _SLAB].to(block.device)
        outside += int(((t < block.amin(dim=0)) | (t > block.amax(dim=0))).sum())
    return {"fraction": outside / float(np.prod(shape[1:])), "ideal": 2.0 / (s + 1)}


def family_mean_std(samples: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-voxel mean and unbiased std (divisor S - 1) of an (S, Z, Y, X) family, one Z
    slab at a time: two (Z, Y, X) float32 tensors."""
    shape = tuple(int(v) for v in np.shape(samples))
    if len(shape) != 4 or shape[0] < 2:
        raise CryowaeInputError(f"samples must be (S, Z, Y, X) with S >= 2, got {shape}")
    mean = torch.empty(shape[1:])
    std = torch.empty(shape[1:])
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples").double()
        mean[z:z + _SLAB] = block.mean(dim=0).float().cpu()
        std[z:z + _SLAB] = block.std(dim=0).float().cpu()
    return mean, std


def predicted_std(std: Any, n_samples: int) -> torch.Tensor:
    """The std the family predicts for the error of its own mean:
    ``std * sqrt((S + 1) / S)`` (module docstring); `std` (Z, Y, X) unbiased."""
    if n_samples < 2:
        raise CryowaeInputError(f"need at least 2 samples, got {n_samples}")
    return as_tensor(std, "std") * math.sqrt((n_samples + 1) / n_samples)


@dataclass(frozen=True)
class Reliability:
    """Reliability of a predicted-std map, per bin of equal voxel count sorted by the
    predicted std (``(n_bins,)`` arrays, intensity units of the volumes):
    ``rmv`` = sqrt(mean predicted variance), ``rmse`` = sqrt(mean squared error),
    ``count`` voxels per bin; ``ence`` = mean of |rmv - rmse| / rmv."""

    rmv: np.ndarray
    rmse: np.ndarray
    count: np.ndarray
    ence: float

    def to_dict(self) -> dict[str, Any]:
        return {"ence": self.ence, "n_bins": len(self.rmv),
                "bins": [[float(a), float(b), int(c)]
                         for a, b, c in zip(self.rmv, self.rmse, self.count, strict=True)],
                "bins_columns": ["rmv", "rmse", "voxels"]}


def reliability(pred_std: Any, error: Any, n_bins: int = ENCE_BINS) -> Reliability:
    """ENCE and the reliability diagram's points (module docstring).

    Parameters
    ----------
    pred_std
        (Z, Y, X) predicted std of the error, >= 0 (e.g. `predicted_std`).
    error
        (Z, Y, X) error of the prediction, e.g. family mean - truth.
    n_bins
        Bins of equal voxel count (the last ones one voxel smaller when the count does
        not divide); voxels of equal predicted std may fall in neighbouring bins.

    A bin whose RMV is 0 (a zero std map) reads inf in the ENCE unless its RMSE is 0.
    """
    u = as_tensor(pred_std, "pred_std").flatten().double().cpu().numpy()
    e = as_tensor(error, "error").flatten().double().cpu().numpy()
    if u.shape != e.shape:
        raise CryowaeInputError(f"pred_std and error differ in size: {u.size} vs {e.size}")
    if not 1 <= n_bins <= u.size:
        raise CryowaeInputError(f"cannot split {u.size} voxels into {n_bins} bins")
    if np.any(u < 0):
        raise CryowaeInputError("pred_std has negative values")
    order = np.argsort(u, kind="stable")
    rmv, rmse, count = [], [], []
    for idx in np.array_split(order, n_bins):
        rmv.append(math.sqrt(float(np.mean(u[idx] ** 2))))
        rmse.append(math.sqrt(float(np.mean(e[idx] ** 2))))
        count.append(idx.size)
    a, b = np.asarray(rmv), np.asarray(rmse)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(a > 0, np.abs(a - b) / np.where(a > 0, a, 1.0),
                        np.where(b > 0, np.inf, 0.0))
    return Reliability(rmv=a, rmse=b, count=np.asarray(count), ence=float(np.mean(norm)))


__all__ = ["ENCE_BINS", "Reliability", "family_mean_std", "outside_range_fraction",
           "predicted_std", "reliability"]
