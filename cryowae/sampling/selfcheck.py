"""Does a family's spread agree with what the data can check? A self-check without
ground truth (issue 21, item 4).

On a central crop (`cryowae.physics.crop.central_box`) the family's predictive
spread per Fourier coefficient, ``(S + 1) / S`` x the unbiased family variance (as
`cryowae.metrics.calibration.spread_skill` counts it against a truth), is compared
with two error estimates of the restoration R that the data give:

- measured region: Stein's unbiased risk estimate of R's squared error per shell
  (`cryowae.sampling.sure`, one probe with its own seed);
- wedge region: the error of R on the data with a second, rotated wedge removed, in the
  band the data measured and the input lacked, less the data's noise there (read from
  the empty slabs in that band itself where there are slabs: the noise is not
  isotropic within a shell) (`cryowae.sampling.extra_wedge.extra_wedge_task`): a wedge
  the restoration must fill, observed. Its per-coefficient error per shell stands for
  the wedge's.

Per region, ``spread/skill = sqrt(sum_k spread / sum_k error)`` over the coefficients
of the region (each shell's error estimate counted once per coefficient of the region
in that shell): about 1 when the family's spread is the size of its error, 2 for a
family twice too wide, 0.5 for one twice too narrow.

The extra-wedge task is harder than the restoration it stands for (its input lacks a
second wedge besides the data's own), so its error over-estimates the wedge's and its
spread/skill is a lower bound of the wedge's: it can show a family too wide there, not
too narrow. The verdict agrees when the measured region lies in [`LOW`, `HIGH`], the
band in which `cryowae evaluate` calls a family calibrated against the ground truth,
and the wedge's lower bound is not above `HIGH` (docs/benchmarks.md, Local spread and
the self-check: the bound read 0.5-0.6 x the ground truth's spread/skill there).

Locally, the family's smoothed per-voxel variance is ranked against the extra-wedge
task's local error power (Spearman correlation over the crop's interior, every
``window_sigma``-th voxel): above 0 the family varies more where the restoration errs
more.

The even/odd halves are not used: the family is sampled from the whole tomogram, so
neither half is independent of it (`cryowae.metrics.calibration_checks.halves_check`
needs a family sampled from one half).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cryowae.metrics.sparsification import gaussian_smooth
from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling.extra_wedge import ExtraWedgeTask, extra_wedge_band, extra_wedge_task
from cryowae.sampling.local_spread import LocalSpreadSettings

#: spread/skill band of a calibrated family (as `cryowae evaluate` reads it)
LOW, HIGH = 0.8, 1.25


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def _ratio(spread: np.ndarray, error: np.ndarray, count: np.ndarray) -> float:
    ok = np.isfinite(spread) & np.isfinite(error) & (count > 0)
    s, e = float((spread[ok] * count[ok]).sum()), float((error[ok] * count[ok]).sum())
    if not e > 0:
        return float("nan")
    return float(np.sqrt(max(s, 0.0) / e))


def _word(r: float, lower_bound: bool = False) -> str:
    """The region's word; of a lower bound only "too wide" is conclusive."""
    if not np.isfinite(r):
        return "undetermined"
    if r > HIGH:
        return f"{r:.2f}x too wide"
    if r < LOW and not lower_bound:
        return f"{1 / r:.2f}x too narrow" if r > 0 else "without spread"
    return "calibrated"


def self_check(samples: Any, data: Any, geometry: TiltGeometry,
               restore: Callable[[np.ndarray], Any], noise: Any = None,
               settings: LocalSpreadSettings | None = None, edge: int = 96,
               seed: int = 1, task: ExtraWedgeTask | None = None) -> dict[str, Any]:
    """The self-check of a family (module docstring).

    Parameters
    ----------
    samples
        (S, Z, Y, X) family (numpy, zarr...; only the crop of each sample is read).
    data
        (Z, Y, X) the tomogram the family was sampled from, same units.
    geometry
        Its tilt geometry.
    restore
        The restoration the family is centred on, as a function of a (Z, Y, X) float32
        array (e.g. ``restore_array`` of the mean path).
    noise
        The data's `NoiseSpectrum` on the crop's grid, for both estimates (default:
        `cryowae.training.slab_noise.noise_from_empty_slabs` of the crop, the empty Z
        slabs of its column, else the ramp fit `noise_without_halves` of the crop; the
        extra-wedge task's from the slabs in its band, `extra_wedge_band`).
    edge, seed, task
        Crop edge (voxels), the SURE probe's seed, an already computed
        `extra_wedge_task` of the same crop.

    Returns
    -------
    dict
        ``spread_skill`` {measured, wedge (a lower bound)}, ``verdict`` (``"agrees"`` or
        ``"disagrees"``), ``line`` (one line for the user), ``local_rank_correlation``,
        per-shell columns.
    """
    from cryowae.metrics.calibration import family_spread, shell_frequencies
    from cryowae.physics.crop import central_box, crop_of, family_crop_of
    from cryowae.sampling.sure import sure_shell_error
    from cryowae.training.slab_noise import column_of, noise_from_empty_slabs

    st = settings or LocalSpreadSettings()
    crop = central_box(np.shape(data), edge, even=True)
    d = crop_of(data, crop)
    column = column_of(data, crop) if noise is None else None  # read once, for both
    if noise is None:
        noise = noise_from_empty_slabs(d, geometry, column=column)
    n = int(np.shape(samples)[0])
    fam = family_crop_of(samples, crop)
    fs = family_spread(fam, geometry)
    spread = {k: fs.per_shell(k) for k in ("measured", "wedge")}
    count = fs.counts
    sure = sure_shell_error(restore, d.numpy(), geometry, noise, seed=seed)
    if task is None:
        # the task's band holds a part of each shell, where the noise may differ from
        # the shell's average (weighted back-projection's grows away from the tilt axis)
        band_noise = noise if column is None else noise_from_empty_slabs(
            d, geometry, column=column,
            region=lambda shp: extra_wedge_band(shp, geometry, st))
        task = extra_wedge_task(restore, d.numpy(), geometry, band_noise, st)
    error = {"measured": np.asarray(sure.error), "wedge": np.asarray(task.shell_error)}
    ratio = {k: _ratio(spread[k], error[k], count[k]) for k in ("measured", "wedge")}
    words = {k: _word(v, lower_bound=k == "wedge") for k, v in ratio.items()}
    ok = all(w == "calibrated" for w in words.values())
    # local: the family's smoothed variance against the task's local error power
    var = gaussian_smooth(fam.double().var(dim=0), st.window_sigma)
    step = max(1, int(round(st.window_sigma)))
    inner = tuple(slice(min(st.border, (s - 1) // 2), s - min(st.border, (s - 1) // 2), step)
                  for s in var.shape)
    rho = _spearman(var[inner], task.error_power[inner]) if n > 1 else float("nan")
    if ok:
        line = (f"self-check (no ground truth): spread/skill {ratio['measured']:.2f} measured "
                f"(SURE), at least {ratio['wedge']:.2f} wedge (extra-wedge task): the "
                f"spread agrees with what the data can check; local rank correlation with "
                f"the self-supervised error {rho:.2f}")
    else:
        bad = "; ".join(f"{k} region {w} (spread/skill {ratio[k]:.2f})"
                        for k, w in words.items() if w != "calibrated")
        line = (f"WARNING: self-check (no ground truth): the family's spread does not match "
                f"what the data can check: {bad}; band {LOW}-{HIGH}")
    freq = shell_frequencies(tuple(d.shape))
    rows = [[float(f), *(float(v) for v in (spread["measured"][i], error["measured"][i],
                                            spread["wedge"][i], error["wedge"][i]))]
            for i, f in enumerate(freq)]
    return {"spread_skill": ratio, "regions": words,
            "verdict": "agrees" if ok else "disagrees", "line": line,
            "band": [LOW, HIGH], "local_rank_correlation": rho,
            "crop": [[c.start, c.stop] for c in crop], "noise_source": noise.source,
            "per_shell": rows,
            "per_shell_columns": ["frequency", "spread_measured", "error_measured_sure",
                                  "spread_wedge", "error_extra_wedge"]}


__all__ = ["HIGH", "LOW", "self_check"]
