"""Data consistency of a family as a check, not an overwrite.

No sample is made to copy the data: a sample that equals the data in the measured
region carries the data's noise, and a family of such samples has a mean no better
than the raw tomogram (issue 11: family-mean Pearson 0.275 against 0.665 for the single
restoration). Instead, the family is checked: per resolution shell, the residual power
of the samples against the data in the measured region over the data's noise power
(`cryowae.metrics.calibration_checks.measured_residual_ratio`). About 1 is right;
about 0 in the noise-dominated (high) shells means the samples carry the measured
noise; well above 1 means they disagree with the data beyond the noise.

Bounded memory: the check runs on a central crop of at most `CHECK_EDGE` voxels per
axis (the whole volume when smaller), read from the data, the samples and the halves;
the crop's own Fourier grid defines the shells and the measured region (its box edges
spread a little power across neighbouring coefficients, alike for data and samples).

Noise power: from the even/odd halves when given (`noise_from_halves` on the crop,
with the full tomogram taken as ``c (even + odd)`` and c fitted by least squares, 1/2
for a mean), else estimated from the data alone (`noise_from_empty_slabs`: the power
of the empty Z slabs above and below the specimen in the crop's column, all Z planes
over the crop's Y, X; without such slabs the ramp fit `noise_without_halves`, the
measured-region power above 0.35 cycles per voxel as a |k|, its source saying why).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cryowae.metrics.calibration import family_spread, shell_frequencies
from cryowae.metrics.calibration_checks import measured_residual_ratio
from cryowae.physics.crop import central_box, crop_of, family_crop_of
from cryowae.physics.geometry import TiltGeometry
from cryowae.training.noise import NoiseSpectrum, noise_from_halves
from cryowae.training.slab_noise import column_of, noise_from_empty_slabs

#: the check's crop edge (voxels): 96^3 float32 crops of S samples stay small
CHECK_EDGE = 96
#: shells at or above this frequency (cycles per voxel) decide the verdict
HIGH_SHELLS = 0.25
#: consistency choices of `cryowae sample` (no overwrite of the measured region)
CONSISTENCY = ("check", "none")

def noise_of_data(data: torch.Tensor, geometry: TiltGeometry, even: torch.Tensor | None,
                  odd: torch.Tensor | None, column: torch.Tensor | None = None
                  ) -> NoiseSpectrum:
    """The data's noise power per shell of its grid (module docstring), in its units.
    `column`: without halves, the tomogram's Z planes over `data`'s Y, X box
    (`cryowae.training.slab_noise.column_box`), where the empty slabs are looked for;
    None: `data` itself."""
    if even is None or odd is None:
        return noise_from_empty_slabs(data, geometry, column=column)
    s = (even.double() + odd.double())
    s, f = s - s.mean(), data.double() - data.double().mean()
    c = float((s * f).sum() / max(float((s * s).sum()), 1e-300))
    full = noise_from_halves(even, odd, geometry, full_scale=abs(c)).full
    return NoiseSpectrum(full.frequency, full.power, f"{full.source}, c = {c:.3f}")


def region_spread(samples: Any, geometry: TiltGeometry) -> dict[str, float]:
    """Mean per-coefficient variance of the family (unbiased, ortho FFT, the samples'
    units squared) in the wedge and in the measured region: where the family varies."""
    fs = family_spread(samples, geometry, predictive=False)
    out = {name: fs.total(name) for name in ("wedge", "measured")}
    m = out["measured"]
    out["wedge_over_measured"] = out["wedge"] / m if m > 0 else float("nan")
    return out


def consistency_check(samples: Any, data: Any, geometry: TiltGeometry,
                      even: Any = None, odd: Any = None,
                      edge: int = CHECK_EDGE) -> dict[str, Any]:
    """The family's measured-region residual check and its wedge/measured spread, on a
    central crop (module docstring).

    Parameters
    ----------
    samples
        (S, Z, Y, X) family (numpy, zarr...; only the crop of each sample is read).
    data
        (Z, Y, X) the tomogram the family was sampled from, same units.
    geometry
        The tilt geometry (measured region).
    even, odd
        Optional (Z, Y, X) halves of `data` (noise power from their difference).

    Returns
    -------
    dict
        ``crop`` (box), ``noise_source``, ``per_shell`` ([frequency, ratio] rows),
        ``ratio_high`` (median ratio over shells >= `HIGH_SHELLS` cycles per voxel),
        ``verdict``, ``spread`` (`region_spread`).
    """
    shape = tuple(int(s) for s in np.shape(data))
    crop = central_box(shape, edge, even=True)
    d = crop_of(data, crop)
    halves = (crop_of(even, crop), crop_of(odd, crop)) if even is not None else (None, None)
    column = column_of(data, crop) if even is None else None
    noise = noise_of_data(d, geometry, *halves, column=column)
    s_count = int(np.shape(samples)[0])
    fam = family_crop_of(samples, crop)
    res = measured_residual_ratio(fam, d, noise.power, geometry)
    freq, ratio = shell_frequencies(d.shape), res["ratio"]
    high = ratio[(freq >= HIGH_SHELLS) & np.isfinite(ratio)]
    r_high = float(np.median(high)) if high.size else float("nan")
    if not np.isfinite(r_high):
        verdict = "undetermined (crop too small)"
    elif r_high < 0.5:
        verdict = "samples carry the measured noise (ratio well below 1)"
    elif r_high > 2.0:
        verdict = "samples disagree with the data beyond the noise (ratio well above 1)"
    else:
        verdict = "consistent with the data within the noise"
    out: dict[str, Any] = {
        "crop": [[c.start, c.stop] for c in crop], "noise_source": noise.source,
        "per_shell": [[float(f), float(r)] for f, r in zip(freq, ratio, strict=True)],
        "per_shell_columns": ["frequency", "residual_over_noise"],
        "ratio_high": r_high, "high_shells_from": HIGH_SHELLS, "verdict": verdict,
    }
    out["spread"] = region_spread(fam, geometry) if s_count > 1 else None
    return out


def family_lines(meta: dict[str, Any]) -> list[str]:
    """The consistency and spread lines of a ``family.json``."""
    cons = meta.get("consistency")
    if not cons:
        return []

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3g}"

    lines = [f"consistency check ({cons['noise_source']}; central crop): residual/noise "
             f"{num(cons['ratio_high'])} in shells >= {cons['high_shells_from']:g} "
             f"cycles/voxel, about 1 is right: {cons['verdict']}"]
    spread = cons.get("spread")
    if spread:
        lines.append(f"spread per Fourier coefficient: wedge {num(spread['wedge'])}, "
                     f"measured {num(spread['measured'])} (ratio "
                     f"{num(spread['wedge_over_measured'])})")
    return lines


__all__ = ["CHECK_EDGE", "CONSISTENCY", "consistency_check",
           "family_lines", "noise_of_data", "region_spread"]
