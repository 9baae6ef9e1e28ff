"""Calibration of posterior families: is the family's spread the size of its error?

A family is S samples X_1..X_S (S, Z, Y, X) of one tomogram; Y is the truth. Fourier
quantities use ``torch.fft.rfftn(norm="ortho")`` (so the power of a coefficient is a
variance per voxel), counted over the full spectrum (`hermitian_weights`), inside the
sphere ``|k| <= 0.5`` cycles per voxel and without DC (`nyquist_sphere`). The measured
region is the tilt range's mask on the tomogram's own grid (`TiltGeometry.wedge_mask`);
the wedge region is the rest of the sphere. Shells are those of
`cryowae.physics.fourier.shell_index` (width ``1 / max(Z, Y, X)``).

Spread/skill (`spread_skill`). For S exchangeable draws of a calibrated predictive and a
truth drawn from the same predictive, per coefficient, with the family mean Xbar and
the unbiased family variance s^2 = sum_s |X_s - Xbar|^2 / (S - 1):
``E|Xbar - Y|^2 = Var Xbar + Var Y = sigma^2 / S + sigma^2 = (S + 1) / S sigma^2`` and
``E s^2 = sigma^2``. Hence

    ratio = sqrt( (S + 1) / S * sum_R s^2 ) / sqrt( sum_R |Xbar - Y|^2 )

over a region R is 1 for a calibrated family (up to sampling error), c for a family
whose spread is c times too wide about the right centre, and below 1 when the family
is too narrow or its mean is biased. Over all coefficients it equals the real-space
ratio (Parseval).

Coverage (`interval_coverage`): the fraction of voxels whose truth lies in the family's
central interval of probability `level`. By default the interval is the Gaussian
prediction interval ``mean +- t_{S-1} s sqrt(1 + 1/S)``, whose coverage for a calibrated
(Gaussian) family is `level` for any S; with ``method="quantile"`` it is spanned by the
empirical quantiles, whose expected coverage is only about ``level (S - 1) / (S + 1)``.
`wedge_component` projects a volume onto the wedge region (Fourier mask 1 - measured),
so that coverage of the wedge-only component can be scored separately.

CRPS (`crps_ensemble`, by `scoringrules`): the fair (unbiased in S) ensemble CRPS per
voxel, ``mean_s |X_s - y| - sum_{s,t} |X_s - X_t| / (2 S (S - 1))``; for one restoration
it reduces to the absolute error, so it compares with the single restoration's MAE.
For a Gaussian predictive N(mu, sigma^2) and y drawn from it, E CRPS = sigma / sqrt(pi).

Per-voxel range counts and the ENCE are in `cryowae.metrics.uncertainty`, the
sparsification curves in `cryowae.metrics.sparsification`.

Checks without ground truth (even/odd halves, residuals against the data) and the
truth that the data can show (CTF) live in `cryowae.metrics.calibration_checks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.physics.fourier import hermitian_weights, nyquist_sphere, shell_index
from cryowae.physics.geometry import TiltGeometry

#: Z slices sorted at a time (bounds the memory of the per-voxel sort)
_SLAB = 8
_DIMS = (-3, -2, -1)


# ------------------------------------------------------------------ spectral helpers
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


# ------------------------------------------------------------------ spread / skill
@dataclass
class SpreadSkill:
    """Spread/skill of a family (see the module docstring). Per-shell arrays are
    (n_shells,) on the shells of `shell_index` of the tomogram's grid; ``spread_*`` and
    ``error_*`` are per-coefficient means: (S + 1) / S * family variance, and
    |mean - truth|^2 (normalised units squared, ortho FFT)."""

    n_samples: int
    ratio: float
    ratio_measured: float
    ratio_wedge: float
    frequency: np.ndarray
    spread_measured: np.ndarray
    error_measured: np.ndarray
    spread_wedge: np.ndarray
    error_wedge: np.ndarray

    def ratio_per_shell(self, region: str = "wedge") -> np.ndarray:
        """sqrt(spread / error) per shell of ``"wedge"`` or ``"measured"`` (nan where
        a shell has no coefficient in the region)."""
        s, e = getattr(self, f"spread_{region}"), getattr(self, f"error_{region}")
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.sqrt(s / e)

    def to_dict(self) -> dict[str, Any]:
        return {"n_samples": self.n_samples, "spread_skill": self.ratio,
                "spread_skill_measured": self.ratio_measured,
                "spread_skill_wedge": self.ratio_wedge,
                "per_shell": [[float(f), float(a), float(b), float(c), float(d)]
                              for f, a, b, c, d in zip(
                                  self.frequency, self.spread_measured,
                                  self.error_measured, self.spread_wedge,
                                  self.error_wedge, strict=True)],
                "per_shell_columns": ["frequency", "spread_measured", "error_measured",
                                      "spread_wedge", "error_wedge"]}


def spread_skill(samples: Any, truth: Any, measured: TiltGeometry | torch.Tensor
                 ) -> SpreadSkill:
    """Spread/skill ratio of a family against the truth, overall, in the measured and
    in the wedge region, and per shell.

    Parameters
    ----------
    samples
        (S, Z, Y, X) family, S >= 2 (read one sample at a time).
    truth
        (Z, Y, X) ground truth on the samples' intensity scale (see
        `truth_seen_by_data` for what truth to use).
    measured
        The tilt geometry or an rfft-layout measured mask of the (Z, Y, X) grid.
    """
    g = as_tensor(truth, "truth")
    s = check_family(tuple(int(v) for v in np.shape(samples)), tuple(g.shape))
    mean, var = family_spectra(samples)
    err = (mean - torch.fft.rfftn(g.to(mean.device), dim=_DIMS, norm="ortho")).abs().square()
    grid = SpectralGrid.of(g.shape, measured)
    spread = var * ((s + 1) / s)
    sums = {}
    for name, region in (("measured", grid.measured), ("wedge", grid.wedge)):
        sums[name] = (grid.shell_sums(spread, region), grid.shell_sums(err, region),
                      grid.shell_sums(torch.ones_like(err), region))

    def ratio(sp: np.ndarray, er: np.ndarray) -> float:
        return float(np.sqrt(sp.sum() / er.sum())) if er.sum() > 0 else float("nan")

    with np.errstate(invalid="ignore", divide="ignore"):
        per = {k: (v[0] / v[2], v[1] / v[2]) for k, v in sums.items()}
    return SpreadSkill(
        n_samples=s, ratio=ratio(sums["measured"][0] + sums["wedge"][0],
                                 sums["measured"][1] + sums["wedge"][1]),
        ratio_measured=ratio(*sums["measured"][:2]), ratio_wedge=ratio(*sums["wedge"][:2]),
        frequency=shell_frequencies(g.shape), spread_measured=per["measured"][0],
        error_measured=per["measured"][1], spread_wedge=per["wedge"][0],
        error_wedge=per["wedge"][1])


# ------------------------------------------------------------------ coverage
#: how `interval_coverage` builds a family's central interval
INTERVAL_METHODS = ("predictive", "quantile")


def student_t_quantile(p: float, df: int) -> float:
    """Quantile `p` of Student's t with `df` degrees of freedom (df >= 1).

    Hill's (1970) expansion of the t quantile around the normal one, to the fourth
    order in 1/df: within 1e-3 of the exact value for df >= 5 at p <= 0.995 (written
    here because torch has no t quantile and scipy is not a dependency of the core).
    """
    from statistics import NormalDist

    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level {p} is not in (0, 1)")
    z = NormalDist().inv_cdf(p)
    v = float(df)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / v + g2 / v**2 + g3 / v**3 + g4 / v**4


def interval_coverage(samples: Any, gt: Any, levels: Sequence[float] = (0.5, 0.9),
                      method: str = "predictive") -> dict[float, float]:
    """Fraction of ground-truth voxels inside the family's central intervals.

    Parameters
    ----------
    samples
        (S, Z, Y, X) posterior samples, S >= 2 (torch tensor, numpy array or memmap;
        read one Z slab at a time).
    gt
        (Z, Y, X) ground truth, same intensity scale as the samples.
    levels
        Interval probabilities, each in (0, 1).
    method
        ``"predictive"`` (default): per voxel ``mean +- t s sqrt(1 + 1/S)`` with the
        samples' mean, unbiased std s and t the ``(1 + level) / 2`` quantile of Student's
        t with S - 1 degrees of freedom: the prediction interval of a new draw from the
        same (Gaussian) distribution, so a calibrated Gaussian family covers `level`
        of the voxels whatever S (16 samples can show a 90% interval). ``"quantile"``:
        the empirical quantiles of the S samples, whose expected coverage for exact
        draws is only about ``level (S - 1) / (S + 1)`` (0.79 for 90% at S = 16).

    Returns
    -------
    dict
        level -> fraction of voxels with ``lo <= gt <= hi`` (a float in [0, 1]).
    """
    levels = [float(lv) for lv in levels]
    for lv in levels:
        if not 0.0 < lv < 1.0:
            raise CryowaeInputError(f"interval level {lv:g} is not in (0, 1)")
    if method not in INTERVAL_METHODS:
        raise CryowaeInputError(f"unknown interval method {method!r} "
                                f"({', '.join(INTERVAL_METHODS)})")
    shape = tuple(int(s) for s in np.shape(samples))
    g = as_tensor(gt, "gt")
    if len(shape) != 4 or shape[1:] != tuple(g.shape):
        raise CryowaeInputError(f"samples must be (S, Z, Y, X) with (Z, Y, X) = "
                                f"{tuple(g.shape)} of the ground truth, got {shape}")
    s_count = shape[0]
    if s_count < 2:
        raise CryowaeInputError(f"need at least 2 samples for an interval, got {s_count}")
    widths = {lv: student_t_quantile((1.0 + lv) / 2.0, s_count - 1)
              * math.sqrt(1.0 + 1.0 / s_count) for lv in levels}
    inside = dict.fromkeys(levels, 0)
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples")
        truth = g[z:z + _SLAB].to(block.device)
        if method == "predictive":
            mean, std = block.mean(dim=0), block.std(dim=0)
            for lv in levels:
                inside[lv] += int(((truth - mean).abs() <= widths[lv] * std).sum())
            continue
        srt, _ = torch.sort(block, dim=0)
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


def wedge_component(volume: Any, measured: TiltGeometry | torch.Tensor) -> torch.Tensor:
    """The part of a (Z, Y, X) volume in the wedge region: inverse FFT of its spectrum
    times (1 - measured mask). Scoring coverage on the wedge components of family and
    truth (`wedge_coverage`) checks what the data did not measure."""
    v = as_tensor(volume, "volume")
    keep = ~measured_mask(measured, v.shape, device=v.device)
    spec = torch.fft.rfftn(v, dim=_DIMS) * keep
    return torch.fft.irfftn(spec, s=tuple(v.shape), dim=_DIMS)


def wedge_coverage(samples: Any, truth: Any, measured: TiltGeometry | torch.Tensor,
                   levels: Sequence[float] = (0.5, 0.9),
                   method: str = "predictive") -> dict[float, float]:
    """`interval_coverage` of the wedge components of the family and the truth. Holds
    the S projected samples in memory (one family's worth)."""
    g = as_tensor(truth, "truth")
    check_family(tuple(int(v) for v in np.shape(samples)), tuple(g.shape))
    proj = torch.stack([wedge_component(samples[i], measured)
                        for i in range(int(np.shape(samples)[0]))])
    return interval_coverage(proj, wedge_component(g, measured), levels, method)


# ------------------------------------------------------------------ CRPS
def crps_ensemble(samples: Any, truth: Any) -> float:
    """Fair ensemble CRPS averaged over voxels (module docstring), slab by slab, by
    `scoringrules.crps_ensemble` (numpy backend)."""
    import scoringrules as sr

    g = as_tensor(truth, "truth")
    shape = tuple(int(v) for v in np.shape(samples))
    check_family(shape, tuple(g.shape))
    total = 0.0
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples").cpu().double().numpy()
        obs = g[z:z + _SLAB].cpu().double().numpy()
        # "pwm" is the fair estimator in its probability-weighted-moment form (Zamo and
        # Naveau 2018): the same value in O(S log S), where "fair" holds S^2 per voxel
        total += float(sr.crps_ensemble(obs, block, m_axis=0, estimator="pwm",
                                        backend="numpy").sum())
    return total / float(np.prod(shape[1:]))


def crps_report(samples: Any, truth: Any, single: Any = None) -> dict[str, float]:
    """The family's fair CRPS beside the mean absolute errors of the family mean and,
    when given, of the single restoration `single` (Z, Y, X): lower is better for all;
    a family worth sampling beats the single restoration's MAE (the CRPS of one
    restoration taken as a sure prediction)."""
    g = as_tensor(truth, "truth")
    shape = tuple(int(v) for v in np.shape(samples))
    check_family(shape, tuple(g.shape))
    mae_mean = 0.0
    for z in range(0, shape[1], _SLAB):
        block = as_tensor(samples[:, z:z + _SLAB], "samples").double()
        mae_mean += float((block.mean(dim=0) - g[z:z + _SLAB].double()).abs().sum())
    out = {"crps_family": crps_ensemble(samples, g),
           "mae_family_mean": mae_mean / float(np.prod(shape[1:]))}
    if single is not None:
        r = as_tensor(single, "single")
        if tuple(r.shape) != tuple(g.shape):
            raise CryowaeInputError(f"single restoration {tuple(r.shape)} and truth "
                                    f"{tuple(g.shape)} differ in shape")
        out["mae_single"] = float((r.double() - g.double()).abs().mean())
    return out
