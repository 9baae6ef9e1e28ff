"""Sparsification curves: does an uncertainty map point at the voxels with large errors?

Given an error map e (Z, Y, X) (e.g. family mean - truth) and an uncertainty map u of the
same shape, remove the voxels in order of decreasing u and follow the error of those
that remain. With N voxels, after removing the first k = round(f N) (fraction f),

    RMSE(f) = sqrt( sum_{i > k} e_(i)^2 / (N - k) ),   MAE(f) = sum_{i > k} |e_(i)| / (N - k)

(i in the order of decreasing u). Voxels of equal u are removed in random order, and
the curve is its expectation: inside a run of ties the removed error grows linearly
(a constant map therefore reads exactly as random). References:

- oracle: u = |e|, the best any map can do;
- random order: the expected remaining mean of e^2 (or |e|) is the overall one, so the
  random curve is flat at RMSE(0) (MAE(0)).

Sparsification gain (on the RMSE curve, areas over f in [0, f_max] by the trapezoid
rule):

    gain = integral (random - curve) df / integral (random - oracle) df

1 for a map that ranks the voxels as the oracle does, 0 for a map no better than a
random order, negative for one that removes the small errors first.

Maps that need no family, from one (Z, Y, X) restoration r and a Gaussian G of
standard deviation `DETAIL_SIGMA_VOXELS` voxels (per axis):

- `local_magnitude_map`: G * |r - mean r| (how far r departs from its overall mean);
- `local_deviation_map`: G * |r - G * r| (how far r departs from its local mean);
- `local_detail_power_map`: G * (r^2) - (G * r)^2 (r's local variance, the power of its
  detail within the Gaussian window).

They tell whether a family's std map ranks errors better than what the restoration's
own structure already says.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor

#: the Gaussian (standard deviation, voxels per axis) of the restoration-only maps
DETAIL_SIGMA_VOXELS = 2.0
#: points of a sparsification curve: fractions 0, 1/n, ..., (n - 1)/n removed
CURVE_POINTS = 100
_DIMS = (-3, -2, -1)


def gaussian_smooth(volume: Any, sigma: float) -> torch.Tensor:
    """A (Z, Y, X) volume convolved with a Gaussian of standard deviation `sigma` voxels
    along each axis, edges mirrored (symmetric padding of ceil(3 sigma) voxels, then the
    Fourier transfer exp(-2 pi^2 sigma^2 |k|^2), k in cycles per voxel)."""
    from cryowae.physics.fourier import radial_frequency

    if not sigma > 0:
        raise CryowaeInputError(f"smoothing sigma must be positive, got {sigma!r}")
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    pad = int(math.ceil(3 * sigma))
    padded = torch.from_numpy(np.pad(v.cpu().double().numpy(), pad, mode="symmetric"))
    shp = tuple(int(s) for s in padded.shape)
    k2 = radial_frequency(shp, rfft=True).double() ** 2  # type: ignore[arg-type]
    transfer = torch.exp(-2 * math.pi**2 * sigma**2 * k2)
    out = torch.fft.irfftn(torch.fft.rfftn(padded, dim=_DIMS) * transfer, s=shp, dim=_DIMS)
    z, y, x = v.shape
    return out[pad:pad + z, pad:pad + y, pad:pad + x].float().to(v.device)


def local_magnitude_map(restoration: Any, sigma: float = DETAIL_SIGMA_VOXELS) -> torch.Tensor:
    """G * |r - mean r| (module docstring), (Z, Y, X)."""
    r = as_tensor(restoration, "restoration").double()
    return gaussian_smooth((r - r.mean()).abs(), sigma)


def local_deviation_map(restoration: Any, sigma: float = DETAIL_SIGMA_VOXELS) -> torch.Tensor:
    """G * |r - G * r| (module docstring), (Z, Y, X)."""
    r = as_tensor(restoration, "restoration")
    return gaussian_smooth((r - gaussian_smooth(r, sigma)).abs(), sigma)


def local_detail_power_map(restoration: Any,
                           sigma: float = DETAIL_SIGMA_VOXELS) -> torch.Tensor:
    """G * r^2 - (G * r)^2 (module docstring; clipped at 0), (Z, Y, X)."""
    r = as_tensor(restoration, "restoration").double()
    return (gaussian_smooth(r * r, sigma).double()
            - gaussian_smooth(r, sigma).double() ** 2).clamp(min=0).float()


@dataclass(frozen=True)
class Sparsification:
    """One sparsification curve and its references (module docstring): ``fraction``
    removed (n,), ``rmse``/``mae`` of the remaining voxels by the map's order,
    ``oracle_rmse``/``oracle_mae`` by |error|, ``random_rmse``/``random_mae`` (flat),
    ``gain`` (RMSE curve) and ``gain_mae`` (MAE curve)."""

    fraction: np.ndarray
    rmse: np.ndarray
    mae: np.ndarray
    oracle_rmse: np.ndarray
    oracle_mae: np.ndarray
    random_rmse: float
    random_mae: float
    gain: float
    gain_mae: float

    def to_dict(self) -> dict[str, Any]:
        return {"gain": self.gain, "gain_mae": self.gain_mae,
                "random_rmse": self.random_rmse, "random_mae": self.random_mae,
                "curve": [[float(f), float(a), float(b), float(c), float(d)]
                          for f, a, b, c, d in zip(self.fraction, self.rmse, self.mae,
                                                   self.oracle_rmse, self.oracle_mae,
                                                   strict=True)],
                "curve_columns": ["fraction_removed", "rmse", "mae", "oracle_rmse",
                                  "oracle_mae"]}


def _removed_sums(u: np.ndarray, values: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Expected sum of `values` over the first k voxels in order of decreasing u, ties
    in random order (linear inside each run of equal u), for each k in `ks`."""
    order = np.argsort(-u, kind="stable")
    us = u[order]
    cum = np.concatenate([[0.0], np.cumsum(values[order], dtype=np.float64)])
    bounds = np.concatenate([[0], np.flatnonzero(us[1:] != us[:-1]) + 1, [u.size]])
    i = np.minimum(np.searchsorted(bounds, ks, side="right") - 1, bounds.size - 2)
    lo, hi = bounds[i], bounds[i + 1]
    return cum[lo] + (ks - lo) / (hi - lo) * (cum[hi] - cum[lo])


def _remaining(u: np.ndarray, e2: np.ndarray, ea: np.ndarray, ks: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    left = (u.size - ks).astype(np.float64)
    rmse = np.sqrt(np.maximum(e2.sum() - _removed_sums(u, e2, ks), 0.0) / left)
    mae = np.maximum(ea.sum() - _removed_sums(u, ea, ks), 0.0) / left
    return rmse, mae


def _gain(f: np.ndarray, curve: np.ndarray, oracle: np.ndarray, random: float) -> float:
    best = float(np.trapezoid(random - oracle, f))
    return float(np.trapezoid(random - curve, f)) / best if best > 0 else float("nan")


def sparsification(uncertainty: Any, error: Any, n_points: int = CURVE_POINTS
                   ) -> Sparsification:
    """The sparsification curve of `uncertainty` for `error` (module docstring).

    Parameters
    ----------
    uncertainty
        (Z, Y, X) map, larger = less certain (any monotone scale: only its order counts).
    error
        (Z, Y, X) signed error, e.g. family mean - truth (intensity units).
    n_points
        Fractions removed: 0, 1/n, ..., (n - 1)/n.
    """
    u = as_tensor(uncertainty, "uncertainty").flatten().double().cpu().numpy()
    e = as_tensor(error, "error").flatten().double().cpu().numpy()
    if u.shape != e.shape:
        raise CryowaeInputError(f"uncertainty and error differ in size: {u.size} vs {e.size}")
    if not 2 <= n_points <= u.size:
        raise CryowaeInputError(f"cannot draw {n_points} points from {u.size} voxels")
    if not np.all(np.isfinite(u)):
        raise CryowaeInputError("the uncertainty map holds NaN or infinite values")
    f = np.arange(n_points) / n_points
    ks = np.round(f * u.size).astype(np.int64)
    e2, ea = e * e, np.abs(e)
    rmse, mae = _remaining(u, e2, ea, ks)
    o_rmse, o_mae = _remaining(ea, e2, ea, ks)
    r_rmse, r_mae = math.sqrt(float(e2.mean())), float(ea.mean())
    return Sparsification(f, rmse, mae, o_rmse, o_mae, r_rmse, r_mae,
                          _gain(f, rmse, o_rmse, r_rmse), _gain(f, mae, o_mae, r_mae))


__all__ = ["CURVE_POINTS", "DETAIL_SIGMA_VOXELS", "Sparsification", "gaussian_smooth",
           "local_detail_power_map", "local_deviation_map", "local_magnitude_map",
           "sparsification"]
