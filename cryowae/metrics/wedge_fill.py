"""How much of the missing wedge a tomogram holds, without a ground truth.

A raw tomogram of a single-axis tilt series has (almost) no power at the Fourier
coefficients whose direction lies in the missing wedge; a restoration that fills the
wedge puts power there. Per radial shell s (`cryowae.physics.fourier.shell_index`,
width ``1 / max(Z, Y, X)`` cycles per voxel) of the ortho spectrum F of a (Z, Y, X)
volume:

    P_R(s) = sum_{k in s, R} h(k) |F(k)|^2 / sum_{k in s, R} h(k)      (R = measured, wedge)
    fill(s) = P_wedge(s) / P_measured(s)

with h the full-spectrum multiplicity of an rfft column (`hermitian_weights`); the
regions are those of `cryowae.metrics.calibration.SpectralGrid` (the geometry's mask,
inside the Nyquist sphere, without DC). ``fill`` is a mean power per coefficient, so
the wedge's share of Fourier space does not enter: a statistically isotropic volume
(white noise, a restoration that fills the wedge like the measured region) gives 1 in
every shell, a volume whose wedge was removed gives 0. Real specimens are not exactly
isotropic, so values between raw and restored, not against 1, are what to compare.

The summary is the median of ``fill(s)`` over the shells of a frequency band, by
default the band where the raw data hold signal (`signal_band`): the first run of
consecutive shells, from the second outwards (the first holds only a handful of
coefficients; a tomogram's lowest shells may be damped by a high-pass), whose measured
power exceeds ``factor`` times the noise floor, the floor being the median measured
power of the shells at and above ``floor_from`` cycles per voxel (where a tomogram at
a few nm per voxel holds noise only). The floor is flat in frequency, so for a
weighted back-projection (whose noise power grows with |k|) it lies above the noise at
lower frequencies and the band is on the short side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_geometry, as_tensor
from cryowae.metrics.calibration import SpectralGrid, shell_frequencies, spectrum
from cryowae.physics.geometry import TiltGeometry

#: lowest frequency (cycles per voxel) of the shells that set the noise floor
FLOOR_FROM = 0.4
#: a shell holds signal when its measured power exceeds this multiple of the floor
SIGNAL_FACTOR = 2.0


@dataclass(frozen=True)
class WedgeFill:
    """Power per coefficient in the measured and the wedge region, per shell.

    Attributes
    ----------
    frequency
        (n_shells,) shell frequencies, cycles per voxel (shell 0 = DC).
    measured_power, wedge_power
        (n_shells,) mean |F|^2 per coefficient (ortho FFT: variance per voxel) in each
        region; nan where a shell has no coefficient of that region.
    """

    frequency: np.ndarray
    measured_power: np.ndarray
    wedge_power: np.ndarray

    @property
    def ratio(self) -> np.ndarray:
        """(n_shells,) wedge over measured power per coefficient; nan where undefined."""
        with np.errstate(invalid="ignore", divide="ignore"):
            r = self.wedge_power / self.measured_power
        return np.where(np.isfinite(r), r, np.nan)

    def band_ratio(self, band: tuple[float, float] | None) -> float:
        """Median of `ratio` over the shells with ``band[0] <= f <= band[1]`` (nan for
        no band or no defined shell in it)."""
        if band is None:
            return float("nan")
        r = self.ratio
        sel = (self.frequency >= band[0]) & (self.frequency <= band[1]) & np.isfinite(r)
        return float(np.median(r[sel])) if sel.any() else float("nan")

    def as_list(self, voxel_size: float) -> list[list[float]]:
        """``[[resolution_A, ratio], ...]`` for the shells after DC (JSON-friendly; a nan
        ratio stays nan for the caller to write as null)."""
        return [[float(voxel_size / f), float(r)]
                for f, r in zip(self.frequency[1:], self.ratio[1:], strict=True)]


def wedge_fill(volume: Any, geometry: TiltGeometry | None = None) -> WedgeFill:
    """Per-shell power per coefficient of a (Z, Y, X) volume in the measured and the
    missing-wedge region of `geometry` (default -60..60 degrees about Y); module
    docstring."""
    geo = as_geometry(geometry)
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    grid = SpectralGrid.of(v.shape, geo)
    with torch.no_grad():
        power = spectrum(v, "volume").abs().square()
    ones = torch.ones_like(power)
    with np.errstate(invalid="ignore", divide="ignore"):
        pm = grid.shell_sums(power, grid.measured) / grid.shell_sums(ones, grid.measured)
        pw = grid.shell_sums(power, grid.wedge) / grid.shell_sums(ones, grid.wedge)
    return WedgeFill(shell_frequencies(v.shape), pm, pw)


def signal_band(fill: WedgeFill, floor_from: float = FLOOR_FROM,
                factor: float = SIGNAL_FACTOR) -> tuple[float, float] | None:
    """The band (cycles per voxel) where a raw tomogram's measured region holds signal
    (module docstring), from its `wedge_fill`; None when no shell from the second on
    rises `factor` times above the floor."""
    f, p = fill.frequency, fill.measured_power
    high = (f >= floor_from) & np.isfinite(p)
    if not high.any():
        raise CryowaeInputError(f"no measured shell at or above {floor_from:g} cycles per "
                                "voxel to set the noise floor")
    floor = float(np.median(p[high]))
    above = np.isfinite(p) & (p > factor * floor)
    above[:2] = False
    if not above.any():
        return None
    first = int(np.argmax(above))
    last = first
    while last + 1 < len(f) and above[last + 1]:
        last += 1
    return float(f[first]), float(f[last])


__all__ = ["FLOOR_FROM", "SIGNAL_FACTOR", "WedgeFill", "signal_band", "wedge_fill"]
