"""Post-hoc spread recalibration of a posterior family (issue 11).

A family of S samples X_s (S, Z, Y, X) with mean m is widened (or narrowed) about its
mean, per resolution shell and region of Fourier space:

    X_s' = m + F^-1[ a(|k|, region) F(X_s - m) ]

with amplitude factors a >= 0 given per shell frequency (cycles per voxel) for the
measured region and for the wedge region (`ShellFactors`; the regions of the model's
tilt geometry, `TiltGeometry.wedge_mask`). The mean is unchanged; the family variance
of each coefficient is multiplied by a^2. Factors are looked up by |k| (linear
interpolation between the given shells, the end values beyond them), so factors found
on one grid (e.g. training patches) apply to another; DC keeps factor 1.

Factors come from:

- `factors_from_truth`: the oracle, a^2 = error / spread per shell and region against
  a ground truth (simulations only; the upper bound of what per-shell scaling can do);
- `factors_from_errors`: any per-shell estimate of the mean's squared error (e.g. from
  the even/odd halves, `cryowae.sampling.recalibrate_halves`).

Memory: `recalibrate_sample` transforms one whole sample volume (a real volume, its
rfft and the inverse: about four float32 copies of one sample); callers stream the
family one sample at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.calibration import FamilySpread, check_family, family_spread
from cryowae.metrics.calibration import shell_frequencies as _shell_frequencies
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry

_DIMS = (-3, -2, -1)
#: the choices of ``cryowae sample --spread-calibration`` (auto: halves when given,
#: else data)
SPREAD_CALIBRATIONS = ("auto", "halves", "data", "none")
#: largest amplitude factor applied (shells where the family has almost no spread)
MAX_FACTOR = 20.0
#: shells where the restoration passes less than this fraction of the data (its transfer)
#: form the high-frequency tail, whose factors are pooled (`pooled_tail`)
TAIL_TRANSFER = 0.02


@dataclass
class ShellFactors:
    """Amplitude factors per shell. ``frequency`` (n,) cycles per voxel, increasing;
    ``measured`` and ``wedge`` (n,) factors >= 0 for the two Fourier regions."""

    frequency: np.ndarray
    measured: np.ndarray
    wedge: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        self.frequency = np.asarray(self.frequency, dtype=np.float64)
        self.measured = np.asarray(self.measured, dtype=np.float64)
        self.wedge = np.asarray(self.wedge, dtype=np.float64)
        n = self.frequency.shape
        if len(n) != 1 or self.measured.shape != n or self.wedge.shape != n or n[0] < 1:
            raise CryowaeInputError("spread factors need one frequency, measured and wedge "
                                    "value per shell")
        for v in (self.frequency, self.measured, self.wedge):
            if not np.all(np.isfinite(v)) or np.any(v < 0):
                raise CryowaeInputError("spread factors must be finite and >= 0")

    def coefficient_map(self, shape: tuple[int, int, int],
                        geometry: TiltGeometry | torch.Tensor) -> torch.Tensor:
        """Factor of every rfft coefficient of a (Z, Y, X) grid (float32,
        (Z, Y, X // 2 + 1)); DC 1."""
        from cryowae.metrics.calibration import measured_mask

        r = radial_frequency(shape, rfft=True).double().numpy()
        meas = measured_mask(geometry, shape, device="cpu").numpy()
        fm = np.interp(r, self.frequency, self.measured)
        fw = np.interp(r, self.frequency, self.wedge)
        out = np.where(meas, fm, fw)
        out[0, 0, 0] = 1.0
        return torch.from_numpy(out.astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {"frequency": [float(v) for v in self.frequency],
                "measured": [float(v) for v in self.measured],
                "wedge": [float(v) for v in self.wedge], "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShellFactors:
        return cls(np.asarray(data["frequency"]), np.asarray(data["measured"]),
                   np.asarray(data["wedge"]), str(data.get("source", "")))


def _per_shell(fs: FamilySpread) -> dict[str, np.ndarray]:
    """The family's spread per shell of each region (per-coefficient means)."""
    return {name: fs.per_shell(name) for name in ("measured", "wedge")}


def _factor(error: np.ndarray, spread: np.ndarray, max_factor: float) -> np.ndarray:
    """sqrt(error / spread) clipped to [0, max_factor]; 1 where either is undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.sqrt(np.clip(error, 0.0, None) / spread)
    a = np.where(np.isfinite(error) & np.isfinite(spread) & (spread >= 0), a, 1.0)
    return np.clip(np.nan_to_num(a, nan=1.0, posinf=max_factor), 0.0, max_factor)


def factors_from_errors(spread: dict[str, np.ndarray], error: dict[str, np.ndarray],
                        frequency: np.ndarray, source: str,
                        max_factor: float = MAX_FACTOR) -> ShellFactors:
    """Factors a = sqrt(error / spread) per shell and region (``"measured"``,
    ``"wedge"``: per-coefficient means, as `FamilySpread.per_shell`), clipped to
    `max_factor`; 1 where a shell has no coefficient."""
    return ShellFactors(frequency, _factor(error["measured"], spread["measured"], max_factor),
                        _factor(error["wedge"], spread["wedge"], max_factor), source)


def factors_from_truth(samples: Any, truth: Any, geometry: TiltGeometry | torch.Tensor,
                       max_factor: float = MAX_FACTOR) -> ShellFactors:
    """Oracle factors: per shell and region, the family mean's squared error against
    `truth` (Z, Y, X, on the samples' scale) over the family's predictive spread."""
    fs = family_spread(samples, geometry)
    spread, grid = _per_shell(fs), fs.grid
    g = torch.as_tensor(np.asarray(truth, dtype=np.float32))
    err = (fs.mean - torch.fft.rfftn(g, dim=_DIMS, norm="ortho")).abs().square()
    error = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in ("measured", "wedge"):
            region = getattr(grid, name)
            error[name] = (grid.shell_sums(err, region)
                           / grid.shell_sums(torch.ones(err.shape), region))
    return factors_from_errors(spread, error, _shell_frequencies(g.shape), "ground truth",
                               max_factor)


def wiener_error(signal_power: np.ndarray, noise_power: np.ndarray) -> np.ndarray:
    """Per-shell squared error ``P N / (P + N)`` of the Wiener estimate of a signal of
    power P under noise of power N (P clipped at 0; P inf gives N)."""
    p = np.clip(np.asarray(signal_power, dtype=np.float64), 0.0, None)
    n = np.asarray(noise_power, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.isinf(p), n, p * n / (p + n))


def shell_error_estimate(data: Any, geometry: TiltGeometry | torch.Tensor,
                         even: Any = None, odd: Any = None,
                         column: Any = None) -> tuple[np.ndarray, str]:
    """Per-shell squared error (measured region, per-coefficient mean, data units) of a
    restoration of (Z, Y, X) `data`, without ground truth: the Wiener error
    ``P N / (P + N)`` with N the data's noise power (`noise_of_data`: from the even/odd
    halves when given, else from the empty Z slabs of `column`, the tomogram's planes
    over `data`'s Y, X box, or the ramp fit) and P the data's measured power minus N;
    and the noise source."""
    from cryowae.sampling.consistency import noise_of_data
    from cryowae.training.noise import measured_shell_power

    d = torch.as_tensor(np.asarray(data, dtype=np.float32))
    halves = [None if h is None else torch.as_tensor(np.asarray(h, dtype=np.float32))
              for h in (even, odd)]
    col = None if column is None else torch.as_tensor(np.asarray(column, dtype=np.float32))
    noise = noise_of_data(d, geometry, *halves, column=col)  # type: ignore[arg-type]
    power, _ = measured_shell_power(d, geometry)
    return wiener_error(np.nan_to_num(power) - noise.power, noise.power), noise.source


def factors_from_data(spread_measured: np.ndarray, error: np.ndarray,
                      frequency: np.ndarray, source: str,
                      max_factor: float = MAX_FACTOR) -> ShellFactors:
    """One factor per shell for both regions: sqrt(measured-region error estimate over
    the family's measured spread). The data say nothing of the wedge region's error;
    the oracle factors of the benchmark families were alike in the two regions above
    0.06 cycles per voxel (docs/benchmarks.md, "Spread recalibration")."""
    a = _factor(error, spread_measured, max_factor)
    return ShellFactors(frequency, a, a, source)


def pooled_tail(error: np.ndarray, spread: np.ndarray, transfer: np.ndarray,
                threshold: float = TAIL_TRANSFER) -> tuple[np.ndarray, int]:
    """The per-shell error estimate with its high-frequency tail pooled, and the tail's
    first shell (``len(error)`` when there is none).

    The tail starts at the first shell above the peak of the restoration's `transfer`
    (per shell: the fraction of the data it passes, e.g. SURE's divergence over the
    noise) where the transfer is below `threshold`, and runs to Nyquist. There the error
    estimate is the data's power less the noise's, a difference smaller than the noise
    estimate's own inaccuracy (near Nyquist, slab and ramp estimates are off by
    10-35 %), so one shell's estimate is noise. Each tail shell's error becomes
    rho x its `spread`, rho the median over the tail of error / spread (pass the
    estimate unclipped: negative values keep the median unbiased), so that every tail
    shell gets the factor sqrt(rho). The last shell's factor also applies to the box's
    corners beyond Nyquist (`ShellFactors.coefficient_map`), about half of all
    coefficients, so an outlier there would set much of the family's variance."""
    e = np.asarray(error, dtype=np.float64).copy()
    sp = np.asarray(spread, dtype=np.float64)
    t = np.asarray(transfer, dtype=np.float64)
    if not e.shape == sp.shape == t.shape:
        raise CryowaeInputError("pooled_tail: one error, spread and transfer value per "
                                "shell is needed")
    finite = np.isfinite(t)
    if not finite.any():
        return e, e.size
    peak = int(np.argmax(np.where(finite, t, -np.inf)))
    below = np.flatnonzero((np.arange(e.size) > peak) & finite & (t < threshold))
    start = int(below[0]) if below.size else e.size
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = e[start:] / sp[start:]
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size >= 2:
        e[start:] = max(float(np.median(ratio)), 0.0) * sp[start:]
    return e, start


def recalibrate_sample(sample: Any, mean: Any, factor_map: torch.Tensor) -> torch.Tensor:
    """``mean + F^-1[factor_map F(sample - mean)]`` of one (Z, Y, X) sample (float32)."""
    x = torch.as_tensor(np.asarray(sample, dtype=np.float32))
    m = torch.as_tensor(np.asarray(mean, dtype=np.float32))
    if x.shape != m.shape or x.ndim != 3:
        raise CryowaeInputError(f"sample {tuple(x.shape)} and mean {tuple(m.shape)} must be "
                                "the same (Z, Y, X) shape")
    spec = torch.fft.rfftn(x - m, dim=_DIMS) * factor_map
    return m + torch.fft.irfftn(spec, s=tuple(x.shape), dim=_DIMS)


def recalibrate_family(samples: Any, factors: ShellFactors,
                       geometry: TiltGeometry | torch.Tensor) -> torch.Tensor:
    """The recalibrated (S, Z, Y, X) family, in memory (for evaluation and tests)."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    check_family(tuple(x.shape), tuple(x.shape[1:]))
    fmap = factors.coefficient_map(tuple(x.shape[1:]), geometry)
    mean = x.mean(dim=0)
    return torch.stack([recalibrate_sample(x[i], mean, fmap) for i in range(x.shape[0])])


def resolve_mode(mode: str, have_halves: bool) -> str:
    """The calibration `mode` to run (``auto``: ``halves`` with the halves, else
    ``data``); unknown modes and ``halves`` without halves raise `CryowaeInputError`."""
    if mode not in SPREAD_CALIBRATIONS:
        raise CryowaeInputError(f"unknown spread calibration {mode!r}: use "
                                f"{', '.join(SPREAD_CALIBRATIONS)}")
    if mode == "halves" and not have_halves:
        raise CryowaeInputError("--spread-calibration halves needs --even and --odd")
    return ("halves" if have_halves else "data") if mode == "auto" else mode


class _CropView:
    """The central crop of every sample of an (S, Z, Y, X) store, read one at a time."""

    def __init__(self, samples: Any, crop: tuple[slice, ...]) -> None:
        self.samples, self.crop = samples, crop
        self.shape = (int(samples.shape[0]), *(c.stop - c.start for c in crop))

    def __getitem__(self, i: int) -> torch.Tensor:
        from cryowae.physics.crop import crop_of

        return crop_of(self.samples, (int(i), *self.crop))


def estimate_factors(samples: Any, data: Any, geometry: TiltGeometry, mode: str,
                     even: Any = None, odd: Any = None, model: Any = None,
                     wedge_floor: bool = True,
                     restore: Callable[[np.ndarray], Any] | None = None
                     ) -> tuple[ShellFactors, dict[str, Any]]:
    """`factors_from_data` on the central crop (`central_box`, at most 96 voxels per
    axis) of the family, the data and (``mode == "halves"``) the halves; with the
    per-shell error estimate and spread it used. The error estimate is the SURE of
    `restore` (the family's centre, e.g. ``restore_array`` of the mean path) on the
    crop (`cryowae.sampling.sure`), its high-frequency tail pooled (`pooled_tail`; SURE
    is not clipped before the median, so zeros do not pull it down); without it, the
    Wiener error (`shell_error_estimate`, clipped at zero within, not pooled). With the
    stochastic restorer `model`, the wedge factors are multiplied by the
    self-supervised wedge ratio gamma(k) of the whole tomogram
    (`cryowae.sampling.wedge_ratio`; from the halves in ``halves`` mode).
    `wedge_floor`: no shell leaves the wedge, where nothing was measured, with less
    spread per coefficient than the measured region (`cryowae.sampling.wedge_floor`)."""
    from cryowae.physics.crop import central_box, crop_of
    from cryowae.sampling.consistency import CHECK_EDGE
    from cryowae.training.slab_noise import column_of, crop_noise

    crop = central_box(samples.shape[1:], CHECK_EDGE, even=True)
    view = _CropView(samples, crop)
    fs = family_spread(view, geometry)
    spread, grid = _per_shell(fs), fs.grid
    info: dict[str, Any] = {}
    freq = _shell_frequencies(view.shape[1:])
    tail = freq.size
    if restore is not None:
        from cryowae.sampling.sure import sure_shell_error

        d = crop_of(data, crop)
        sure = sure_shell_error(restore, d, geometry, crop_noise(data, crop, geometry, d))
        with np.errstate(invalid="ignore", divide="ignore"):
            transfer = sure.divergence / sure.noise
        error, tail = pooled_tail(np.nan_to_num(sure.error), spread["measured"], transfer)
        error = np.clip(error, 0.0, None)
        source = f"SURE of the restoration, noise {sure.noise_source}"
        if tail < freq.size:
            source += f"; tail from {freq[tail]:.3f} cycles/voxel pooled"
        info["sure"] = sure.to_dict()
    else:
        halves = (crop_of(even, crop), crop_of(odd, crop)) if mode == "halves" \
            else (None, None)
        column = column_of(data, crop) if mode != "halves" else None
        error, source = shell_error_estimate(crop_of(data, crop), geometry, *halves,
                                             column=column)
    factors = factors_from_data(spread["measured"], error, freq, f"{mode}: {source}")
    info |= {"crop": [[c.start, c.stop] for c in crop],
             "tail_from_shell": tail,
             "error_measured": [float(v) for v in np.nan_to_num(error)],
             "spread_measured": [float(v) for v in np.nan_to_num(spread["measured"])]}
    if model is not None:
        from cryowae.sampling.wedge_ratio import wedge_ratio

        ratio = wedge_ratio(model, data, *((even, odd) if mode == "halves" else (None, None)),
                            geometry)
        factors = ShellFactors(freq, factors.measured, factors.wedge * ratio.at(freq),
                               factors.source + "; wedge x self-supervised wedge ratio")
        info["wedge_ratio"] = ratio.to_dict()
    if wedge_floor:
        from cryowae.sampling.wedge_floor import floored_wedge_factors

        wedge, raised = floored_wedge_factors(factors.measured, factors.wedge, spread,
                                              view.shape[0], grid, MAX_FACTOR)
        factors = ShellFactors(freq, factors.measured, wedge,
                               factors.source + "; wedge spread >= measured")
        info["wedge_floor_shells"] = raised
    return factors, info


__all__ = ["MAX_FACTOR", "SPREAD_CALIBRATIONS", "TAIL_TRANSFER", "ShellFactors",
           "estimate_factors", "factors_from_data", "factors_from_errors", "factors_from_truth",
           "pooled_tail", "recalibrate_family", "recalibrate_sample",
           "resolve_mode", "shell_error_estimate", "wiener_error"]
