"""The data's noise power per resolution shell, and noise drawn with that power.

Power is the mean ``|F(n)(k)|^2`` per Fourier coefficient of the ortho FFT, which for
white noise equals its variance per voxel; it is kept as a function of |k| (cycles per
voxel) so that noise measured on a tomogram's grid can be drawn on patches of another
size (`NoiseSpectrum.at` interpolates between shells). Units are those of the volumes
given: pass normalised volumes (or `NoiseSpectrum.scaled` by 1 / std^2) to get the
power in the units the restorer trains in.

Estimates (measured region only: the missing wedge holds neither signal nor noise):

- `noise_from_halves`: with even/odd halves e = t + n_e, o = t + n_o of independent
  noise of equal power, ``E|F(e - o)|^2 = 2 N_half``; the full tomogram
  ``c (e + o)`` (c = 1/2 for a mean, as `cryowae simulate` writes) has noise power
  ``2 c^2 N_half``. Assumes the halves share the signal: tilt series split into even and
  odd tilts sample different directions, so at frequencies beyond the Crowther limit of
  a half the estimate includes signal difference: against the exact noise of
  `cryowae simulate` (80x128x128, 3 degree steps, halves 6 degrees apart) it was up to
  1.9x too high from 0.13 to 0.26 cycles per voxel (benchmarks/bench_noise_estimates.py).
- `noise_without_halves`: no second measurement, so the signal must be told apart by
  frequency: above `signal_free_from` cycles per voxel the measured power is taken as
  noise and modelled as ``a |k|^p``, by default with p = 1, the ramp that weighted
  back-projection puts on white image noise (or p fitted by least squares in log-log,
  clipped to [0, 2]); the model is extrapolated to lower shells and capped by the
  measured power of each shell (noise cannot exceed the total). Against the exact
  noise of `cryowae simulate` (same seed with and without noise) p = 1 came within
  about 10% per shell above 0.05 cycles per voxel on 64^3 grids and within 30% on
  32^3, and within 8% from 0.05 to 0.47 cycles per voxel on the 80x96x96 central crops
  of 80x128x128 simulations (benchmarks/bench_noise_estimates.py); a fitted p swung
  between 0.2 and 1 with the fitting range and missed by up to a factor 2.7 at low
  frequency. Where signal reaches Nyquist the estimate is too high.

- the empty Z slabs above and below the specimen (`cryowae.training.slab_noise`): no
  halves and no model of the reconstruction's filter; where a tomogram has such slabs
  it is the default without halves, the ramp fit its fallback.

`draw_noise` draws real-space noise whose Fourier coefficients are complex Gaussian with
the spectrum's power at their |k| (Hermitian symmetric, so the result is real).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
from cryowae.physics.crop import central_crop
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry

_DIMS = (-3, -2, -1)


@dataclass(frozen=True)
class NoiseSpectrum:
    """Noise power per shell.

    Attributes
    ----------
    frequency
        Shell frequencies, cycles per voxel, increasing, (n,).
    power
        Mean |F|^2 per coefficient (ortho FFT) at each frequency, (n,), >= 0.
    source
        How it was estimated (shown in logs and checkpoints).
    """

    frequency: np.ndarray
    power: np.ndarray
    source: str = ""

    def at(self, radius: torch.Tensor) -> torch.Tensor:
        """Power at frequencies `radius` (cycles per voxel, any shape): linear
        interpolation between shells, the end values beyond them."""
        f = torch.as_tensor(self.frequency, dtype=torch.float64, device=radius.device)
        p = torch.as_tensor(self.power, dtype=torch.float64, device=radius.device)
        r = radius.double().clamp(float(f[0]), float(f[-1]))
        hi = torch.searchsorted(f, r).clamp(1, len(f) - 1)
        lo = hi - 1
        t = ((r - f[lo]) / (f[hi] - f[lo])).clamp(0.0, 1.0)
        return (p[lo] * (1 - t) + p[hi] * t).to(radius.dtype)

    def scaled(self, factor: float) -> NoiseSpectrum:
        """The spectrum with power multiplied by `factor` (e.g. 1 / std^2 to normalise)."""
        return NoiseSpectrum(self.frequency, self.power * float(factor), self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"frequency": [float(v) for v in self.frequency],
                "power": [float(v) for v in self.power], "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseSpectrum:
        return cls(np.asarray(data["frequency"], dtype=np.float64),
                   np.asarray(data["power"], dtype=np.float64), str(data.get("source", "")))


@dataclass(frozen=True)
class HalvesNoise:
    """Noise of the full tomogram and of one half, from the even/odd difference."""

    full: NoiseSpectrum
    half: NoiseSpectrum


def measured_shell_power(volume: Any, measured: TiltGeometry | torch.Tensor
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Mean |F|^2 per coefficient (ortho) of a (Z, Y, X) volume in each shell of the
    measured region (`cryowae.physics.fourier.shell_index`, DC and corners
    beyond Nyquist left out), and the number of coefficients per shell."""
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    grid = SpectralGrid.of(v.shape, measured)
    power = torch.fft.rfftn(v, dim=_DIMS, norm="ortho").abs().square()
    count = grid.shell_sums(torch.ones_like(power), grid.measured)
    with np.errstate(invalid="ignore", divide="ignore"):
        return grid.shell_sums(power, grid.measured) / count, count


def noise_from_halves(even: Any, odd: Any, measured: TiltGeometry | torch.Tensor,
                      full_scale: float = 0.5) -> HalvesNoise:
    """Noise power per shell of the full tomogram ``full_scale * (even + odd)`` and of
    one half, from the halves' difference in the measured region (module docstring).

    Parameters
    ----------
    even, odd
        (Z, Y, X) halves with independent noise (tensors, arrays or memmaps; read
        whole: one rfft of the volume is held in memory).
    measured
        Tilt geometry or rfft measured mask of the (Z, Y, X) grid.
    full_scale
        c in ``full = c (even + odd)``: 0.5 for a mean (cryowae's simulator), 1 for a sum.
    """
    e, o = as_tensor(even, "even"), as_tensor(odd, "odd")
    if e.shape != o.shape:
        raise CryowaeInputError(f"even/odd halves differ in shape: {tuple(e.shape)} vs "
                                f"{tuple(o.shape)}")
    diff, _ = measured_shell_power(e - o, measured)
    diff = np.nan_to_num(diff)
    freq = shell_frequencies(e.shape)
    return HalvesNoise(
        full=NoiseSpectrum(freq, full_scale**2 * diff, "even/odd difference (full)"),
        half=NoiseSpectrum(freq, diff / 2, "even/odd difference (half)"))


def noise_without_halves(volume: Any, measured: TiltGeometry | torch.Tensor,
                         signal_free_from: float = 0.35,
                         exponent: float | None = 1.0) -> NoiseSpectrum:
    """Noise power per shell of a single tomogram, from its measured-region power above
    `signal_free_from` cycles per voxel, modelled as ``a |k|^p`` (module docstring).

    Parameters
    ----------
    volume
        (Z, Y, X) tomogram.
    measured
        Tilt geometry or rfft measured mask.
    signal_free_from
        Lowest frequency (cycles per voxel, < 0.5) where the signal is taken as
        negligible.
    exponent
        p of the model ``a |k|^p`` (1: weighted back-projection); None fits it.
    """
    if not 0.0 < signal_free_from < 0.5:
        raise CryowaeInputError(f"signal_free_from must lie in (0, 0.5) cycles per voxel, "
                                f"got {signal_free_from:g}")
    v = as_tensor(volume, "volume")
    power, count = measured_shell_power(v, measured)
    freq = shell_frequencies(v.shape)
    use = (freq >= signal_free_from) & (count > 0) & (power > 0)
    if use.sum() < 2:
        raise CryowaeInputError(f"fewer than two measured shells above {signal_free_from:g} "
                                "cycles per voxel: volume too small for this estimate")
    lk, lp, wt = np.log(freq[use]), np.log(power[use]), count[use]
    if exponent is None:
        p = np.polyfit(lk, lp, 1, w=np.sqrt(wt))[0]
        p = float(np.clip(p, 0.0, 2.0))
    else:
        p = float(exponent)
    a = float(np.average(lp - p * lk, weights=wt))
    k = np.maximum(freq, freq[1])
    model = np.exp(a) * k**p
    est = np.where(count > 0, np.minimum(model, np.nan_to_num(power, nan=np.inf)), model)
    how = "fitted" if exponent is None else "fixed"
    return NoiseSpectrum(freq, est, f"power above {signal_free_from:g} cycles/voxel as "
                                    f"a |k|^{p:.2f} ({how} p)")


def draw_noise(spectrum: NoiseSpectrum, shape: tuple[int, int, int], batch: int = 1,
               generator: torch.Generator | None = None,
               device: torch.device | str | None = None,
               measured: torch.Tensor | None = None) -> torch.Tensor:
    """Real-space noise (B, 1, Z, Y, X) with the spectrum's power per shell.

    White Gaussian noise is transformed (ortho rfft: complex Gaussian coefficients of
    unit power, Hermitian symmetric), multiplied by ``sqrt(power(|k|))`` and transformed
    back. `measured` (rfft layout, broadcastable to (B, Z, Y, X // 2 + 1)) keeps the
    noise in a region only, e.g. a patch's measured mask; None: everywhere.
    `generator` must live on `device` (torch's rule for random draws).
    """
    shp = tuple(int(s) for s in shape)
    white = torch.randn((batch, *shp), generator=generator, device=device)
    amp = spectrum.at(radial_frequency(shp, rfft=True, device=white.device)).sqrt()  # type: ignore[arg-type]
    spec = torch.fft.rfftn(white, dim=_DIMS, norm="ortho") * amp
    if measured is not None:
        spec = spec * measured.to(spec.real.dtype)
    return torch.fft.irfftn(spec, s=shp, dim=_DIMS, norm="ortho")[:, None]


def target_noise(sources: Sequence[Any], geometry: TiltGeometry, how: str = "auto",
                 edge: int = 128) -> NoiseSpectrum:
    """The noise power per shell of the training *targets*, in the normalised units the
    restorer trains in, averaged over `sources` (`cryowae.training.data.TomogramSource`).

    With halves (``how`` ``auto`` or ``halves``) a target is one half, normalised by its
    own std: `noise_from_halves` (``half``) divided by the halves' mean variance. Without
    (``auto`` or ``estimate``) the target is the full tomogram: the power of its empty Z
    slabs (`cryowae.training.slab_noise.crop_noise`, else the ramp fit
    `noise_without_halves`) divided by its variance. Each estimate reads the central
    cube of at most `edge` voxels per axis, the slabs its column of all Z planes
    (memory bounded; noise is taken as stationary).
    """
    from cryowae.physics.crop import central_box
    from cryowae.training.slab_noise import crop_noise

    if how not in ("auto", "halves", "estimate"):
        raise CryowaeInputError(f"unknown noise source {how!r}")
    powers, freq, source = [], None, ""
    for src in sources:
        halves = src.has_halves and how in ("auto", "halves")
        if how == "halves" and not src.has_halves:
            raise CryowaeInputError(f"{src.name}: family noise 'halves' needs --even/--odd")
        if halves:
            e, o = central_crop(src.even, edge), central_crop(src.odd, edge)
            var = 0.5 * (src.stats["even"][1] ** 2 + src.stats["odd"][1] ** 2)
            spec = noise_from_halves(e, o, geometry).half.scaled(1.0 / var)
        else:
            box = central_box(np.shape(src.full), edge)
            spec = crop_noise(src.full, box, geometry).scaled(1.0 / src.stats["full"][1] ** 2)
        if freq is None:
            freq, source = spec.frequency, spec.source
        powers.append(np.interp(freq, spec.frequency, spec.power))
    if freq is None:
        raise CryowaeInputError("no training sources to estimate the noise from")
    return NoiseSpectrum(freq, np.mean(powers, axis=0), f"{source}, normalised")


__all__ = ["HalvesNoise", "NoiseSpectrum", "draw_noise", "measured_shell_power",
           "noise_from_halves", "noise_without_halves", "target_noise"]
