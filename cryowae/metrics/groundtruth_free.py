"""Figures of a restoration that need no ground truth (what `cryowae evaluate RESTORED
--tomogram RAW` prints without ``--gt``).

For each volume scored (the restoration and, when given, the raw tomogram it came
from, both (Z, Y, X) of one shape):

- wedge fill (`cryowae.metrics.wedge_fill`): power per coefficient in the missing wedge
  over that in the measured region, per shell and as the median over the band where
  the raw data hold signal (`signal_band` of the raw tomogram, else of the volume
  scored);
- streak ratio (`cryowae.metrics.streaks`): power at the wedge-edge elevations over the
  flanking elevations, in the empty blocks of the raw tomogram (the same blocks for
  both volumes), away from the annotated points when an annotation is given;
- with an annotation (`cryowae.metrics.visibility`): the contrast of beam-facing
  against side-facing patches.

With two halves (``even``, ``odd``: restored or raw halves, as the caller has them):
their FSC (`cryowae.metrics.fsc`, torch-fourier-shell-correlation; resolutions at 0.143
and 0.5) and their Fourier correlation in the measured and the wedge region
(`cryowae.metrics.fourier_regions`): independent halves agree only in what the data
determine, so agreement in the wedge says the filling is reproducible, not that it is
right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_geometry, as_tensor, check_finite_tensor, check_pair
from cryowae.metrics.fourier_regions import region_correlations
from cryowae.metrics.fsc import fsc_curve
from cryowae.metrics.streaks import StreakSettings, find_empty_blocks, streak_power
from cryowae.metrics.visibility import Annotation, VisibilitySettings, shell_visibility
from cryowae.metrics.wedge_fill import signal_band, wedge_fill
from cryowae.physics.geometry import TiltGeometry


@dataclass(frozen=True)
class GroundTruthFreeSettings:
    """Settings of the streak and visibility figures and, optionally, a fixed band
    (cycles per voxel) for the wedge-fill summary instead of the raw data's signal
    band."""

    streaks: StreakSettings = field(default_factory=StreakSettings)
    visibility: VisibilitySettings = field(default_factory=VisibilitySettings)
    band: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.band is not None:
            lo, hi = (float(x) for x in self.band)
            if not 0.0 <= lo < hi <= 0.5:
                raise CryowaeInputError(f"wedge-fill band must satisfy 0 <= low < high <= "
                                        f"0.5 cycles per voxel, got ({lo:g}, {hi:g})")
            object.__setattr__(self, "band", (lo, hi))


def _volume_figures(volume: Any, geometry: TiltGeometry, band: tuple[float, float] | None,
                    blocks: np.ndarray, annotation: Annotation | None,
                    settings: GroundTruthFreeSettings, voxel_size: float) -> dict[str, Any]:
    fill = wedge_fill(volume, geometry)
    out: dict[str, Any] = {"wedge_fill": fill.band_ratio(band)}
    out.update(streak_power(volume, blocks, geometry, settings.streaks))
    if annotation is not None:
        out["visibility"] = shell_visibility(volume, annotation, settings.visibility)
    out["wedge_fill_per_shell"] = fill.as_list(voxel_size)
    return out


def halves_figures(even: Any, odd: Any, voxel_size: float,
                   geometry: TiltGeometry | None = None) -> dict[str, Any]:
    """FSC of two halves (resolutions at 0.143 and 0.5, Angstrom, and the curve) and
    their Fourier correlation in the measured and the wedge region."""
    curve = fsc_curve(even, odd, voxel_size)
    cc = region_correlations(even, odd, geometry)
    return {"fsc_0143_A": curve.resolution_at(0.143), "fsc_05_A": curve.resolution_at(0.5),
            "cc_measured": cc["cc_measured"], "cc_wedge": cc["cc_wedge"],
            "fsc": curve.as_list()}


def evaluate_without_truth(restored: Any, voxel_size: float,
                           geometry: TiltGeometry | None = None, raw: Any = None,
                           halves: tuple[Any, Any] | None = None,
                           annotation: Annotation | None = None,
                           settings: GroundTruthFreeSettings | None = None
                           ) -> dict[str, Any]:
    """The ground-truth-free figures of `restored` and, when given, of `raw` (module
    docstring).

    Parameters
    ----------
    restored, raw
        (Z, Y, X) volumes of one shape (torch, numpy or `Volume`), any intensity scale.
    voxel_size
        Angstrom per voxel (resolutions of the per-shell lists and the FSC).
    geometry
        Tilt range and axis (default -60..60 degrees about Y).
    halves
        (even, odd) volumes of the same shape, or None.
    annotation
        Points and normals in voxels of these volumes, or None.

    Returns
    -------
    dict
        ``restored`` (and ``raw``): each ``wedge_fill``, ``streak_ratio``,
        ``edge_power``, ``flank_power``, ``n_blocks``, ``visibility`` (with an
        annotation), ``wedge_fill_per_shell`` ([[resolution_A, ratio], ...]);
        ``halves`` (with halves); ``band_cycles_per_voxel`` / ``band_A`` (nan-free
        list or None) and ``band_source``; ``empty_blocks`` (starts, z, y, x) and
        ``block``; ``voxel_size_A``, ``shape``, ``tilt_*``.
    """
    s = settings or GroundTruthFreeSettings()
    geo = as_geometry(geometry)
    if not (isinstance(voxel_size, int | float) and math.isfinite(voxel_size)
            and voxel_size > 0):
        raise CryowaeInputError(f"voxel size must be a positive number of Angstrom, got "
                                f"{voxel_size!r}")
    vols = {"restored": as_tensor(restored, "restored")}
    if raw is not None:
        vols["raw"] = as_tensor(raw, "raw")
        check_pair(vols["restored"], vols["raw"], ("restored", "raw"))
    for name, t in vols.items():
        if t.ndim != 3:
            raise CryowaeInputError(f"{name}: expected a (Z, Y, X) volume, got shape "
                                    f"{tuple(t.shape)}")
        check_finite_tensor(t, name)
    ref_name = "raw" if raw is not None else "restored"
    ref = vols[ref_name]
    if s.band is not None:
        band, source = s.band, "given"
    else:
        band = signal_band(wedge_fill(ref, geo))
        source = f"signal band of the {ref_name} tomogram's measured region"
    blocks = find_empty_blocks(ref, s.streaks,
                               annotation.points if annotation is not None else None)
    report: dict[str, Any] = {}
    for name in ("raw", "restored"):
        if name in vols:
            report[name] = _volume_figures(vols[name], geo, band, blocks, annotation, s,
                                           float(voxel_size))
    if halves is not None:
        even, odd = (as_tensor(h, n) for h, n in zip(halves, ("even", "odd"), strict=True))
        check_pair(even, odd, ("even", "odd"))
        check_pair(even, vols["restored"], ("even", "restored"))
        check_finite_tensor(even, "even")
        check_finite_tensor(odd, "odd")
        report["halves"] = halves_figures(even, odd, float(voxel_size), geo)
    report.update({
        "band_cycles_per_voxel": list(band) if band is not None else None,
        "band_A": [float(voxel_size) / f if f > 0 else math.inf for f in band]
        if band is not None else None,
        "band_source": source,
        "block": s.streaks.block_for(tuple(ref.shape)),
        "empty_blocks": [[int(c) for c in b] for b in blocks],
        "voxel_size_A": float(voxel_size),
        "shape": [int(n) for n in ref.shape],
        "tilt_min": geo.tilt_min, "tilt_max": geo.tilt_max, "tilt_axis": geo.axis,
        "tilt_source": geo.source,
    })
    return report


__all__ = ["GroundTruthFreeSettings", "evaluate_without_truth", "halves_figures"]
