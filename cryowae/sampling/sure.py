"""The restoration's own error per resolution shell, without ground truth: Stein's
unbiased risk estimate (SURE) in the measured region of Fourier space (issue 11).

The spread recalibration needs, per shell, how far the restoration R(x) of the data
x = s + n lies from the signal s. For Gaussian noise n whose covariance is diagonal in
the ortho Fourier basis with power N(k) per coefficient (the measured region only: the
wedge holds no data), Stein's lemma gives, per coefficient k,

    E|R_k - s_k|^2 = E|R_k - x_k|^2 - N(k) + 2 E Re[conj(n_k) R_k]
                   = E|R_k - x_k|^2 - N(k) + 2 N(k) dR_k/dx_k,

and the divergence term is estimated by Monte Carlo (Hutchinson's trace estimator,
as in MC-SURE): with a probe b drawn with the same spectrum,
``Re[conj(b_k) (R(x + eps b) - R(x))_k] / eps`` has the expectation N(k) dR_k/dx_k.
Averaged over the coefficients of a shell, one probe is enough (thousands of
coefficients per shell). Nothing here knows the network: R is any function, e.g. the
tile-by-tile restoration of `cryowae.inference.restore.restore_array`.

Why not the Wiener error ``P N / (P + N)`` (`recalibrate.wiener_error`, the estimate
before this one): it is the error of the best *linear* filter per shell, while the
network denoises better than that at 0.1-0.25 cycles per voxel and worse at the lowest
shells; its errors cancelled in the total on some seeds and not on others (without the
halves the measured region came out 25-29% too wide on seeds 7-9). On the 80x96x96
central crops of two 80x128x128 simulations with noise-free twins
(benchmarks/bench_noise_estimates.py, seeds 10 and 11) SURE summed over 0.03-0.3 cycles
per voxel came to 1.02x and 1.00x the exact error of the restoration, within about 10%
at most shells, where the Wiener error gave 1.62x and 1.22x and was up to 2.1x off
per shell (docs/benchmarks.md, "Spread recalibration").

The noise N(k) comes from the data alone: the spread calibration passes the power of
the empty Z slabs of the crop's column (`cryowae.training.slab_noise.crop_noise`, no
model of the reconstruction's filter); without such slabs, and by default here, it is
`cryowae.training.noise.noise_without_halves`, the ramp of weighted back-projection
fitted above 0.35 cycles per voxel: against the
exact noise of those simulations it is within 8% per shell from 0.05 to 0.47 cycles per
voxel, while the even/odd difference over-estimates it up to 1.9x at 0.13-0.26 cycles
per voxel (even and odd tilts see different directions there), so the halves are not
used for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.metrics.calibration import SpectralGrid
from cryowae.metrics.calibration import shell_frequencies as _shell_frequencies
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.training.noise import NoiseSpectrum, draw_noise, noise_without_halves

_DIMS = (-3, -2, -1)
#: probe size relative to the noise (the probe has the noise's spectrum times this)
EPSILON = 0.1


@dataclass
class SureEstimate:
    """Per shell of the data's grid (``frequency``, cycles per voxel), measured region,
    per-coefficient means in data units squared: the error estimate ``error`` =
    ``residual - noise + 2 divergence``, and its three terms."""

    frequency: np.ndarray
    error: np.ndarray
    residual: np.ndarray
    noise: np.ndarray
    divergence: np.ndarray
    noise_source: str

    def to_dict(self) -> dict[str, Any]:
        return {k: [float(v) for v in np.nan_to_num(getattr(self, k))]
                for k in ("frequency", "error", "residual", "noise", "divergence")} | {
                    "noise_source": self.noise_source}


def _spectrum(v: Any) -> torch.Tensor:
    return torch.fft.rfftn(torch.as_tensor(np.asarray(v, dtype=np.float32)), dim=_DIMS,
                           norm="ortho")


def probe_divergence(probe: torch.Tensor, moved: torch.Tensor, base: torch.Tensor,
                     epsilon: float = EPSILON) -> torch.Tensor:
    """Per coefficient, the Monte Carlo estimate of ``N(k) dR_k/dx_k`` (module
    docstring): ``Re[conj(b_k) (R(x + eps b) - R(x))_k] / eps`` from the spectra of the
    probe b (`probe`), of R(x + eps b) (`moved`) and of R(x) (`base`)."""
    return (probe.conj() * (moved - base)).real / epsilon


def sure_error(residual: Any, noise: Any, divergence: Any) -> Any:
    """SURE of the squared error: ``|R - x|^2 - N + 2 N dR/dx`` (per coefficient, or
    per shell of means), from the residual power, the noise power and
    `probe_divergence`."""
    return residual - noise + 2.0 * divergence


def sure_shell_error(restore: Callable[[np.ndarray], Any], data: Any,
                     geometry: TiltGeometry, noise: NoiseSpectrum | None = None,
                     probes: int = 1, epsilon: float = EPSILON,
                     seed: int = 0) -> SureEstimate:
    """SURE of the squared error of ``restore(data)`` per shell (module docstring).

    Parameters
    ----------
    restore
        Maps a (Z, Y, X) float32 array (data units) to its restoration, same shape and
        units.
    data
        (Z, Y, X) tomogram (or a crop of one).
    geometry
        Its tilt geometry (the measured region).
    noise
        Noise power per shell in data units; default `noise_without_halves(data)`.
    probes, epsilon, seed
        Monte Carlo probes of the divergence, their size relative to the noise, and the
        seed of their draws.
    """
    x = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    if noise is None:
        noise = noise_without_halves(torch.from_numpy(x), geometry)
    grid = SpectralGrid.of(tuple(x.shape), geometry)
    region = grid.measured
    count = grid.shell_sums(torch.ones(region.shape), region)

    def shell_mean(v: torch.Tensor) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return grid.shell_sums(v, region) / count

    fx = _spectrum(x)
    rx = np.asarray(restore(x), dtype=np.float32)
    frx = _spectrum(rx)
    residual = shell_mean((frx - fx).abs().square())
    power = noise.at(radial_frequency(x.shape, rfft=True)).float()  # type: ignore[arg-type]
    noise_shell = shell_mean(power)
    gen = torch.Generator().manual_seed(int(seed))
    divergence = np.zeros_like(residual)
    for _ in range(max(1, int(probes))):
        b = draw_noise(noise, x.shape, generator=gen, measured=region)[0, 0].numpy()
        fr = _spectrum(np.asarray(restore(x + epsilon * b), dtype=np.float32))
        divergence += shell_mean(probe_divergence(_spectrum(b), fr, frx, epsilon))
    divergence /= max(1, int(probes))
    error = sure_error(residual, noise_shell, divergence)
    return SureEstimate(_shell_frequencies(x.shape), error, residual, noise_shell,
                        divergence, noise.source)


__all__ = ["EPSILON", "SureEstimate", "probe_divergence", "sure_error", "sure_shell_error"]
