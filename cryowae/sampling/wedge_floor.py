"""The wedge floor of the spread recalibration (issue 11): no resolution shell leaves
the missing wedge, where nothing was measured, with less family spread per Fourier
coefficient than the measured region at the same |k|.

The floor is applied to the factors found on the central crop (`recalibrate.
estimate_factors`) with a margin of three standard errors of the crop's estimate of
the ratio of the two regions' spreads (`floor_margin`), so that it also holds on the
shells of another grid (the whole volume's): at the floor without a margin, a shell
came out 4-7% under there (seeds 8 and 10, docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import torch

from cryowae.metrics.calibration import SpectralGrid


def floor_margin(n_samples: int, grid: SpectralGrid) -> np.ndarray:
    """Per shell of `grid`, 1 + 3 standard errors of the ratio of the wedge's to the
    measured region's mean family variance per coefficient: each coefficient's variance
    from S = `n_samples` samples has a relative error sqrt(2 / (S - 1)), averaged over
    the shell's coefficients of each region (1 where a region has none)."""
    ones = torch.ones(grid.measured.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        inv = sum(1.0 / grid.shell_sums(ones, getattr(grid, r)) for r in ("measured", "wedge"))
        se = np.sqrt(2.0 / max(int(n_samples) - 1, 1) * inv)
    return 1.0 + 3.0 * np.nan_to_num(se, nan=0.0, posinf=0.0)


def floored_wedge_factors(measured: np.ndarray, wedge: np.ndarray,
                          spread: dict[str, np.ndarray], n_samples: int,
                          grid: SpectralGrid, max_factor: float) -> tuple[np.ndarray, int]:
    """Wedge factors raised to ``a_w^2 s_w >= margin a_m^2 s_m`` per shell (`spread`:
    the family's ``"measured"`` and ``"wedge"`` spread per coefficient on `grid`), clipped
    to `max_factor`; and how many shells were raised."""
    margin = floor_margin(n_samples, grid)
    with np.errstate(invalid="ignore", divide="ignore"):
        least = measured * np.sqrt(margin * spread["measured"] / spread["wedge"])
    least = np.where(np.isfinite(least), least, 0.0)
    raised = wedge < least
    return np.clip(np.maximum(wedge, least), 0.0, max_factor), int(raised.sum())


__all__ = ["floor_margin", "floored_wedge_factors"]
