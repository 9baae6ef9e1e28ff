"""Spectral bookkeeping of posterior families: shells, regions and the family's spread.

Fourier quantities use ``torch.fft.rfftn(norm="ortho")`` (the power of a coefficient is a
variance per voxel), counted over the full spectrum (`hermitian_weights`), inside the
sphere ``|k| <= 0.5`` cycles per voxel and without DC (`nyquist_sphere`). The measured
region is the tilt range's mask on the volume's own grid (`TiltGeometry.wedge_mask`);
the wedge region is the rest of the sphere. Shells are those of
`cryowae.physics.fourier.shell_index` (width ``1 / max(Z, Y, X)``).

`family_spread` is the one place where a family's spread per shell and region is
computed: the spread/skill of `cryowae.metrics.calibration`, the halves check, the
spread recalibration, the self-check and the consistency check's region spread use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.physics.fourier import hermitian_weights, nyquist_sphere, shell_index
from cryowae.physics.geometry import TiltGeometry

_DIMS = (-3, -2, -1)


def shell_frequencies(shape: Sequence[int]) -> np.ndarray:
    """Frequency (cycles per voxel) of each shell of `cryowae.physics.fourier.shell_index`
    (shell j: ``j / max(Z, Y, X)``)."""
    n = max(int(s) for s in shape)
    return np.arange(n // 2 + 1) / n


def measured_mask(measured: TiltGeometry | torch.Tensor, shape: Sequence[int],
                  device: torch.device | str | None = None) -> torch.Tensor:
    """A boolean rfft-layout measured-region mask from a geometry or a given mask."""
    shp = tuple(int(s) for s in shape)
    m = measured.wedge_mask(shp, rfft=True, device=device) if isinstance(
        measured, TiltGeometry) else torch.as_tensor(measured, device=device)
    want = (*shp[:2], shp[2] // 2 + 1)
    if tuple(m.shape) != want:
        raise CryowaeInputError(f"measured mask has shape {tuple(m.shape)}, the rfft of a "
                                f"{shp} volume needs {want}")
    return m > 0.5


def spectrum(v: Any, name: str) -> torch.Tensor:
    """The ortho rfft (Z, Y, X // 2 + 1) of a (Z, Y, X) volume (tensor, array, memmap)."""
    return torch.fft.rfftn(as_tensor(v, name), dim=_DIMS, norm="ortho")


@dataclass
class SpectralGrid:
    """Per-coefficient bookkeeping of one (Z, Y, X) grid: shell labels, full-spectrum
    multiplicities, and the measured / wedge regions (inside the sphere, no DC)."""

    labels: torch.Tensor
    n_shells: int
    mult: torch.Tensor
    measured: torch.Tensor
    wedge: torch.Tensor

    @classmethod
    def of(cls, shape: Sequence[int], measured: TiltGeometry | torch.Tensor) -> SpectralGrid:
        shp = tuple(int(s) for s in shape)
        lab, n = shell_index(shp)  # type: ignore[arg-type]
        m = measured_mask(measured, shp, device="cpu")
        inside = nyquist_sphere(shp)  # type: ignore[arg-type]
        mult = hermitian_weights(shp[-1]).expand(lab.shape)
        return cls(lab, n, mult, inside & m, inside & ~m)

    def shell_sums(self, values: torch.Tensor, region: torch.Tensor) -> np.ndarray:
        """Full-spectrum sums of `values` (any device; summed on the CPU) per shell over
        `region` (float64 (n_shells,))."""
        sel = region.flatten()
        v = values.detach().to("cpu", torch.float64) * self.mult
        return torch.bincount(self.labels.flatten()[sel], v.flatten()[sel],
                              minlength=self.n_shells).numpy()


def check_family(shape: tuple[int, ...], truth_shape: tuple[int, ...]) -> int:
    """S of an (S, Z, Y, X) family checked against a (Z, Y, X) truth (S >= 2)."""
    if len(shape) != 4 or shape[1:] != truth_shape:
        raise CryowaeInputError(f"samples must be (S, Z, Y, X) with (Z, Y, X) = "
                                f"{truth_shape}, got {shape}")
    if shape[0] < 2:
        raise CryowaeInputError(f"need at least 2 samples, got {shape[0]}")
    return shape[0]


def family_spectra(samples: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Welford over samples (read one at a time): mean spectrum and the unbiased
    per-coefficient variance sum_s |F_s - mean|^2 / (S - 1)."""
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None
    n = 0
    for i in range(int(np.shape(samples)[0])):
        f = spectrum(samples[i], "samples")
        n += 1
        if mean is None:
            mean, m2 = f.clone(), torch.zeros(f.shape, device=f.device)
            continue
        d = f - mean
        mean += d / n
        m2 += (d.conj() * (f - mean)).real
    assert mean is not None and m2 is not None
    return mean, m2 / (n - 1)


def predictive_spread(variance: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The spread a family of `n_samples` predicts for its mean's error per coefficient:
    ``(S + 1) / S`` x the unbiased family variance (module docstring)."""
    return variance * ((n_samples + 1) / n_samples)


@dataclass
class FamilySpread:
    """A family's spread per shell and region (`family_spread`): its mean spectrum
    ``mean``, the `SpectralGrid`, and per region (``"measured"``, ``"wedge"``) the
    full-spectrum ``sums`` of the per-coefficient spread over each shell and the
    ``counts`` of coefficients there (float64 (n_shells,))."""

    n_samples: int
    mean: torch.Tensor
    grid: SpectralGrid
    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]

    def per_shell(self, region: str) -> np.ndarray:
        """Per-coefficient mean spread per shell (nan where a shell has no coefficient
        in the region)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sums[region] / self.counts[region]

    def total(self, region: str) -> float:
        """Per-coefficient mean spread over the whole region (nan when it is empty)."""
        n = self.counts[region].sum()
        return float(self.sums[region].sum() / n) if n else float("nan")


def family_spread(samples: Any, measured: TiltGeometry | torch.Tensor,
                  predictive: bool = True) -> FamilySpread:
    """The spread of an (S, Z, Y, X) family (read one sample at a time) per shell of the
    measured and the wedge region: `predictive_spread` by default, the unbiased family
    variance itself with ``predictive=False``. `measured`: the tilt geometry or an
    rfft-layout measured mask of the (Z, Y, X) grid."""
    shape = tuple(int(v) for v in np.shape(samples))
    s = check_family(shape, shape[1:])
    mean, var = family_spectra(samples)
    grid = SpectralGrid.of(shape[1:], measured)
    spread = predictive_spread(var, s) if predictive else var
    ones = torch.ones(var.shape)
    regions = {"measured": grid.measured, "wedge": grid.wedge}
    return FamilySpread(s, mean, grid,
                        {k: grid.shell_sums(spread, r) for k, r in regions.items()},
                        {k: grid.shell_sums(ones, r) for k, r in regions.items()})


__all__ = ["FamilySpread", "SpectralGrid", "check_family", "family_spectra", "family_spread",
           "measured_mask", "predictive_spread", "shell_frequencies", "spectrum"]
