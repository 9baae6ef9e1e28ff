"""Calibration checks without ground truth, and the ground truth the data can show.

Companions of `cryowae.metrics.calibration` (same Fourier conventions: ortho rfft,
full-spectrum counting, shells of `cryowae.physics.fourier.shell_index`, sphere without DC):

- `halves_check`: real data, even/odd halves. Does a family restored from half A
  predict, by its spread plus the noise, how far its mean lies from half B?
- `measured_residual_ratio`: per shell, residual power of samples against the data in
  the measured region over the noise power (about 1 is right; 0 flags samples that
  copy the measured noise).
- `truth_seen_by_data`: the ground truth filtered by |CTF| or low-passed before the
  CTF's first zero, for calibration figures on simulated data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.metrics.calibration import (
    SpectralGrid,
    check_family,
    family_spectra,
    shell_frequencies,
    spectrum,
)
from cryowae.physics.ctf import CTFParams
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry

_DIMS = (-3, -2, -1)


def _noise_array(noise_power: Sequence[float] | np.ndarray, n_shells: int) -> np.ndarray:
    p = np.asarray(noise_power, dtype=np.float64)
    if p.shape != (n_shells,):
        raise CryowaeInputError(f"noise power must have one value per shell ({n_shells}), "
                                f"got shape {p.shape}")
    return p


def halves_check(samples_a: Any, half_b: Any, noise_power_b: Sequence[float] | np.ndarray,
                 measured: TiltGeometry | torch.Tensor) -> dict[str, np.ndarray]:
    """Does the spread of a family restored from half A predict how far its mean lies
    from the independent half B? Real data, no ground truth; measured region, per shell.

    With b = t + n_b (half B, noise power N_b per coefficient, independent of half A)
    and a calibrated family of S draws from half A (mean Xbar, unbiased variance s^2):
    ``E|Xbar - b|^2 = E|Xbar - t|^2 + N_b = (S + 1) / S s^2 + N_b``. The returned
    ``ratio`` = observed / predicted per shell is about 1 when calibrated, above 1 when
    the family is too narrow, below when too wide. (Comparing the restorations of the
    two halves with each other would not work: in a linear-Gaussian model their
    difference has power 2 W^2 N per coefficient, W the Wiener gain, while their
    spreads add to 2 W N; only against raw data does spread + noise predict the gap.)

    Parameters
    ----------
    samples_a
        (S, Z, Y, X) family restored from half A only.
    half_b
        (Z, Y, X) the other half, in the samples' units.
    noise_power_b
        Noise power of half B per shell of `cryowae.physics.fourier.shell_index` (e.g.
        `cryowae.training.noise.noise_from_halves(...).half.power`).
    measured
        Tilt geometry or rfft measured mask.

    Returns
    -------
    dict
        ``frequency``, ``observed``, ``predicted``, ``ratio`` (per shell, nan where a
        shell has no measured coefficient).
    """
    b = as_tensor(half_b, "half_b")
    s = check_family(tuple(int(v) for v in np.shape(samples_a)), tuple(b.shape))
    mean, var = family_spectra(samples_a)
    grid = SpectralGrid.of(b.shape, measured)
    count = grid.shell_sums(torch.ones(var.shape), grid.measured)
    noise = _noise_array(noise_power_b, grid.n_shells)
    gap = (mean - torch.fft.rfftn(b.to(mean.device), dim=_DIMS, norm="ortho")).abs().square()
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = grid.shell_sums(gap, grid.measured) / count
        predicted = grid.shell_sums(var * ((s + 1) / s), grid.measured) / count + noise
        return {"frequency": shell_frequencies(b.shape), "observed": observed,
                "predicted": predicted, "ratio": observed / predicted}


def measured_residual_ratio(samples: Any, data: Any,
                            noise_power: Sequence[float] | np.ndarray,
                            measured: TiltGeometry | torch.Tensor) -> dict[str, np.ndarray]:
    """Per shell, residual power of the samples against the data in the measured
    region over the data's noise power: is each sample consistent with the data within
    the noise (and no more)?

    Linear-Gaussian model per coefficient: t ~ CN(0, P), d = t + n, n ~ CN(0, N),
    posterior mean W d with W = P / (P + N), posterior variance W N. Then
    ``E|s - d|^2 / N`` is: **1** for a calibrated posterior draw s = W d + xi
    ((1 - W)^2 (P + N) + W N = N); **1 - W** for the posterior mean or any single
    denoised restoration (about 1 in noise-dominated shells, about 0 where signal
    dominates); **0** for a family that carries the measured noise (s = d in the
    measured region, e.g. hard data consistency); **1 - W + c^2 W** for draws whose
    spread is c times the posterior's (only signal-dominated shells see c). So read
    about 1 everywhere as right; 0 in the noise-dominated shells flags samples that
    copy the data's noise.

    Parameters
    ----------
    samples
        (S, Z, Y, X) family (S >= 1 here; a single restoration as (1, Z, Y, X)).
    data
        (Z, Y, X) the data the family was restored from, in the samples' units.
    noise_power
        Noise power of `data` per shell of `cryowae.physics.fourier.shell_index` (ortho FFT units).
    measured
        Tilt geometry or rfft measured mask.

    Returns
    -------
    dict
        ``frequency``, ``ratio`` (per shell, averaged over samples; nan where a shell
        has no measured coefficient or no noise).
    """
    d = as_tensor(data, "data")
    shape = tuple(int(v) for v in np.shape(samples))
    if len(shape) != 4 or shape[1:] != tuple(d.shape):
        raise CryowaeInputError(f"samples must be (S, Z, Y, X) with (Z, Y, X) = "
                                f"{tuple(d.shape)}, got {shape}")
    grid = SpectralGrid.of(d.shape, measured)
    noise = _noise_array(noise_power, grid.n_shells)
    fd = torch.fft.rfftn(d, dim=_DIMS, norm="ortho")
    resid = np.zeros(grid.n_shells)
    for i in range(shape[0]):
        f = spectrum(samples[i], "samples")
        resid += grid.shell_sums((f - fd.to(f.device)).abs().square(), grid.measured)
    count = grid.shell_sums(torch.ones(fd.shape), grid.measured)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = resid / shape[0] / count / noise
    return {"frequency": shell_frequencies(d.shape), "ratio": ratio}


# ------------------------------------------------------------------ ground truth and CTF
#: how `truth_seen_by_data` treats the CTF
TRUTH_MODES = ("abs_ctf", "first_zero", "none")


def ctf_radial(frequency_per_A: torch.Tensor, params: CTFParams) -> torch.Tensor:
    """The CTF at spatial frequencies |k| in 1/Angstrom, in the sign convention of
    `cryowae.physics.ctf.ctf_2d` (+A at zero frequency), through torch-ctf's phase."""
    from torch_ctf import calculate_total_phase_shift

    def t(v: float) -> torch.Tensor:
        return torch.tensor(float(v), dtype=torch.float64)

    phase = calculate_total_phase_shift(
        t(params.defocus), t(params.voltage), t(params.cs), t(0.0),
        t(params.amplitude_contrast), frequency_per_A.double() ** 2)
    return (-torch.sin(phase)).to(torch.float32)


def ctf_first_zero(voxel_size: float, params: CTFParams) -> float:
    """Frequency (cycles per voxel) of the CTF's first zero, or inf if there is none
    below Nyquist."""
    k = torch.linspace(0.0, 0.5, 4097, dtype=torch.float64)
    c = ctf_radial(k / voxel_size, params)
    flips = torch.nonzero(torch.sign(c[1:]) != torch.sign(c[:-1]))
    return float(k[int(flips[0, 0]) + 1]) if flips.numel() else float("inf")


def truth_seen_by_data(gt: Any, voxel_size: float, params: CTFParams | None,
                       mode: str = "abs_ctf") -> torch.Tensor:
    """The ground truth as the data can show it, for calibration figures.

    A phase-flipped tomogram (what `cryowae simulate` writes) equals the truth filtered
    by |CTF(|k|)| in the measured region, plus noise: 2D phase flipping leaves |CTF| on
    each tilt image, and by the central-slice theorem a 3D frequency k on the slice of
    tilt theta has in-plane frequency |k|, so the 3D transfer is |CTF(|k|)| (the defocus
    gradient across tilted images is ignored, as in the simulator). Near the CTF's zeros
    no restorer can know the truth, so a family cannot be calibrated against the raw
    truth there. Modes: ``abs_ctf`` multiplies the spectrum of `gt` by |CTF(|k|)|
    (what the data measure); ``first_zero`` keeps frequencies below the first zero with
    a cosine edge over the last 10% (the band the data pass with one sign); ``none``
    returns `gt`. `params` None (CTF off, e.g. ``meta["config"]["ctf"]`` false) returns
    `gt` for every mode. Read the parameters of a simulation with
    `ctf_params_from_meta`.
    """
    if mode not in TRUTH_MODES:
        raise CryowaeInputError(f"unknown truth mode {mode!r}: use {', '.join(TRUTH_MODES)}")
    g = as_tensor(gt, "gt")
    if params is None or mode == "none":
        return g
    if not voxel_size > 0:
        raise CryowaeInputError(f"voxel size must be positive, got {voxel_size!r} A")
    r = radial_frequency(tuple(g.shape), rfft=True, device=g.device)  # type: ignore[arg-type]
    if mode == "abs_ctf":
        filt = ctf_radial(r / voxel_size, params).abs()
    else:
        k0 = ctf_first_zero(voxel_size, params)
        edge = ((k0 - r) / (0.1 * k0)).clamp(0.0, 1.0) if np.isfinite(k0) else torch.ones_like(r)
        filt = torch.sin(0.5 * np.pi * edge) ** 2
    spec = torch.fft.rfftn(g, dim=_DIMS) * filt.to(g.device)
    return torch.fft.irfftn(spec, s=tuple(g.shape), dim=_DIMS)


def ctf_params_from_meta(meta: Any) -> CTFParams | None:
    """CTF parameters from a cryowae simulation's ``meta.json`` (its ``config``: ``ctf``,
    ``defocus`` (um), ``voltage`` (kV), ``cs`` (mm), ``amplitude_contrast``), or None
    when the simulation had the CTF switched off. Raises `CryowaeInputError` for
    metadata cryowae does not understand (not a JSON object, a CTF setting missing or
    not a number), e.g. another simulator's."""
    cfg = meta.get("config", meta) if isinstance(meta, dict) else None
    if not isinstance(cfg, dict):
        raise CryowaeInputError("simulation metadata is not a JSON object with a config")
    if cfg.get("ctf", True) is False:
        return None
    try:
        return CTFParams(float(cfg["defocus"]), float(cfg["voltage"]), float(cfg["cs"]),
                         float(cfg["amplitude_contrast"]))
    except KeyError as exc:
        raise CryowaeInputError(f"simulation metadata lacks the CTF setting {exc}") from None
    except (TypeError, ValueError):
        raise CryowaeInputError("simulation metadata has a CTF setting that is not a "
                                "number") from None
