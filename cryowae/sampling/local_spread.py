"""Local spread of a posterior family: where in the tomogram the family should vary
(issue 21, item 2).

The per-shell recalibration (`cryowae.sampling.recalibrate`) is a stationary filter: it
sets how much the family varies per resolution shell and Fourier region, not where.
This module modulates each sample's deviation from the family mean m by a smooth
spatial gain g(x),

    X_s'' = m + g(x) (X_s' - m),

with g^2 proportional to a predicted local error variance v(x) over the family's own
(smoothed) local variance V(x), normalised so that the family's total variance
sum_x g^2 V_emp is unchanged (V_emp: the family's per-voxel variance). The mean is
unchanged; per shell the variance moves by the convolution of the deviations'
spectrum with that of g, narrow for a g smooth over `window_sigma` voxels.

The predicted error variance is a function of the restoration R's local detail power

    D(x) = G_w * (R - G_d * R)^2          (G_s: Gaussian smoothing of width s voxels)
    v(x) = D~(x)^b + c,   D~ = D / mean(D),

whose shape parameters (b, c) are fitted without ground truth on the restoration's own
errors in a self-supervised task (`extra_wedge_task`): the data x (measured region M of
the tilt geometry) lose a second, rotated wedge (input ``F^-1[M_R F x]``, the training
task of `cryowae.training.augment.make_batch` with the rotation on the mask); in the
band B = M minus M_R the data measured what the input lacks, so the restoration's
error there, e_B = ``F^-1[1_B F(R(x_R) - x)]``, is observed up to the data's noise,
which is independent of the input in B and stationary with a known local power
n_B = sum_B N(k) / voxels (ortho FFT, full-spectrum counting). The local power
p(x) = G_w * e_B^2 has expectation a v(x) + n_B for some scale a, and (a, b, c) minimise
the Gaussian log score of the local power,

    S = mean_x [ log(a v(x) + n_B) + p(x) / (a v(x) + n_B) ],

a proper scoring rule for the local mean square (minimised at a v + n_B = E p). The
fitted shape (b, c) is then evaluated on the restoration of the whole data. b = 0 (or
c large) gives a flat v: g then only undoes the family's own spatial pattern.

Smoothing: `cryowae.metrics.sparsification.gaussian_smooth` (mirrored edges).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.sparsification import gaussian_smooth
from cryowae.physics.fourier import hermitian_weights, nyquist_sphere, radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import wedge_mask

_DIMS = (-3, -2, -1)
#: largest crop edge (voxels) of the error model's fit
FIT_EDGE = 128


@dataclass(frozen=True)
class LocalSpreadSettings:
    """Settings of the local spread.

    detail_sigma
        Width (voxels) of the local mean subtracted from the restoration for its detail.
    window_sigma
        Width (voxels) of the local averages: detail power, observed error power, the
        family's variance; g varies on this scale.
    rotation_deg
        Rotation (degrees, about Z) of the second wedge of the self-supervised task.
    max_gain
        g is kept within [1 / max_gain, max_gain].
    border
        Voxels at each face of the fitting crop left out of the score (reflected
        smoothing and the crop's box edges).
    enabled
        Whether `cryowae sample` applies the step (``--no-local-spread`` turns it off);
        the in-memory functions here ignore it.
    """

    detail_sigma: float = 2.0
    window_sigma: float = 3.0
    rotation_deg: float = 90.0
    max_gain: float = 4.0
    border: int = 6
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("detail_sigma", "window_sigma", "max_gain"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise CryowaeInputError(f"local spread: {name} must be > 0, got {v}")
        if self.max_gain < 1:
            raise CryowaeInputError(f"local spread: max_gain must be >= 1, got {self.max_gain}")
        if not math.isfinite(self.rotation_deg):
            raise CryowaeInputError("local spread: rotation_deg must be finite")
        if self.border < 0:
            raise CryowaeInputError(f"local spread: border must be >= 0, got {self.border}")

    def describe(self) -> dict[str, Any]:
        """The settings as ``family.json`` and the resume fingerprint record them."""
        return {"enabled": self.enabled, "detail_sigma": self.detail_sigma,
                "window_sigma": self.window_sigma, "rotation_deg": self.rotation_deg,
                "max_gain": self.max_gain, "border": self.border}


@dataclass(frozen=True)
class ErrorModel:
    """v(x) = a (D~(x)^b + c) (module docstring); ``a`` in the units of the fit's data
    squared (only the shape (b, c) is used on other volumes)."""

    a: float
    b: float
    c: float
    score: float = float("nan")
    score_flat: float = float("nan")

    def shape(self, detail: torch.Tensor, detail_mean: float | None = None) -> torch.Tensor:
        """D~^b + c of a detail-power map, D~ = D / `detail_mean` (default: the map's own
        mean; a slab of a volume passes the volume's)."""
        mean = float(detail.double().mean()) if detail_mean is None else float(detail_mean)
        d = detail.double() / max(mean, 1e-300)
        return d.clamp_min(1e-12) ** self.b + self.c

    def to_dict(self) -> dict[str, float]:
        return {"a": self.a, "b": self.b, "c": self.c, "score": self.score,
                "score_flat": self.score_flat}


def detail_power(restoration: Any, settings: LocalSpreadSettings) -> torch.Tensor:
    """D = G_w * (R - G_d * R)^2 of a (Z, Y, X) restoration."""
    r = torch.as_tensor(np.asarray(restoration, dtype=np.float64))
    detail = r - gaussian_smooth(r, settings.detail_sigma)
    return gaussian_smooth(detail**2, settings.window_sigma)


def _rotation_z(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    # (z, y, x) coordinates: a rotation in the Y-X plane
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass
class ExtraWedgeTask:
    """The self-supervised task on one (crop of a) tomogram (module docstring).

    restoration: R(x_R) (Z, Y, X); error_power: p = G_w * e_B^2; noise_power: n_B (the
    data noise's local power in B); band: B (rfft mask); shell_error and shell_count:
    per shell of `cryowae.physics.fourier.shell_index`, mean |R(x_R) - x|^2 - N over the
    coefficients of B (data units squared per coefficient) and their number."""

    restoration: torch.Tensor
    error_power: torch.Tensor
    noise_power: float
    band: torch.Tensor
    shell_error: np.ndarray
    shell_count: np.ndarray


def extra_wedge_task(restore: Callable[[np.ndarray], Any], data: Any,
                     geometry: TiltGeometry, noise: Any = None,
                     settings: LocalSpreadSettings | None = None) -> ExtraWedgeTask:
    """Restore `data` (Z, Y, X) without a second, rotated wedge and measure the error
    in the band the data hold and the input lacks (module docstring).

    `restore` maps a (Z, Y, X) float32 array to its restoration (same units);
    `noise` a `cryowae.training.noise.NoiseSpectrum` of the data (default: the ramp fit
    `noise_without_halves`)."""
    from cryowae.metrics.calibration import SpectralGrid
    from cryowae.training.noise import noise_without_halves

    st = settings or LocalSpreadSettings()
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(data, dtype=np.float32)))
    shape = tuple(int(v) for v in x.shape)
    if len(shape) != 3:
        raise CryowaeInputError(f"local spread: data must be (Z, Y, X), got {shape}")
    if noise is None:
        noise = noise_without_halves(x, geometry)
    m = geometry.wedge_mask(shape, rfft=True) > 0.5
    m_r = wedge_mask(shape, geometry.tilt_min, geometry.tilt_max, geometry.axis, rfft=True,
                     rotation=_rotation_z(st.rotation_deg)) > 0.5
    band = m & ~m_r & nyquist_sphere(shape)
    fx = torch.fft.rfftn(x.double(), dim=_DIMS, norm="ortho")
    x_in = torch.fft.irfftn(fx * m_r, s=shape, dim=_DIMS, norm="ortho").float()
    r = torch.as_tensor(np.asarray(restore(x_in.numpy()), dtype=np.float32)).double()
    diff = torch.fft.rfftn(r, dim=_DIMS, norm="ortho") - fx
    e_b = torch.fft.irfftn(diff * band, s=shape, dim=_DIMS, norm="ortho")
    n_k = noise.at(radial_frequency(shape, rfft=True)).double()
    w = hermitian_weights(shape[-1], torch.float64).expand(n_k.shape)
    voxels = float(np.prod(shape))
    n_b = float((w * n_k * band).sum()) / voxels
    grid = SpectralGrid.of(shape, geometry)
    count = grid.shell_sums(torch.ones(band.shape), band)
    with np.errstate(invalid="ignore", divide="ignore"):
        shell_error = grid.shell_sums(diff.abs().square() - n_k, band) / count
    return ExtraWedgeTask(r.float(), gaussian_smooth(e_b**2, st.window_sigma), n_b, band,
                          shell_error, count)


def _interior(shape: tuple[int, ...], border: int) -> tuple[slice, ...]:
    return tuple(slice(min(border, (n - 1) // 2), n - min(border, (n - 1) // 2))
                 for n in shape)


def fit_error_model(detail: torch.Tensor, error_power: torch.Tensor, noise_power: float,
                    settings: LocalSpreadSettings | None = None,
                    iterations: int = 200) -> ErrorModel:
    """(a, b, c) minimising the Gaussian log score of the local error power given the
    detail power (module docstring), on the interior of the maps, every
    ``window_sigma``-th voxel along each axis (neighbours of a smoothed map say little
    more). ``score_flat`` is the score of the best flat v (b = 0), for comparison."""
    st = settings or LocalSpreadSettings()
    if detail.shape != error_power.shape:
        raise CryowaeInputError("local spread: detail and error maps differ in shape")
    inner = _interior(tuple(detail.shape), st.border)
    step = max(1, int(round(st.window_sigma)))
    sub = tuple(slice(s.start, s.stop, step) for s in inner)
    d = detail.double()[inner]
    d = (d / max(float(d.mean()), 1e-300))[tuple(slice(None, None, step) for _ in range(3))]
    p = error_power.double()[sub].flatten()
    logd = d.clamp_min(1e-12).log().flatten()
    n = max(float(noise_power), 0.0)
    scale = max(float(p.mean()), 1e-300)
    p, n = p / scale, n / scale

    def score(theta: torch.Tensor) -> torch.Tensor:
        a, b, c = theta[0].exp(), theta[1], theta[2].exp()
        v = a * ((b * logd).exp() + c) + n
        return (v.log() + p / v).mean()

    theta = torch.tensor([math.log(max(float(p.mean()) - n, 1e-3)), 0.5, 0.0],
                         dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        s = score(theta)
        s.backward()
        return s

    opt.step(closure)
    with torch.no_grad():
        best = score(theta)
        flat_v = max(float(p.mean()), n + 1e-12)
        flat = math.log(flat_v) + float(p.mean()) / flat_v
    t = theta.detach()
    return ErrorModel(float(t[0].exp()) * scale, float(t[1]), float(t[2].exp()),
                      float(best), float(flat))


def fit_on_crop(restore: Callable[[np.ndarray], Any], data: Any, geometry: TiltGeometry,
                settings: LocalSpreadSettings | None = None) -> tuple[ErrorModel, dict[str, Any]]:
    """The error model fitted on the extra-wedge task of the data's central crop (at
    most `FIT_EDGE` voxels per axis), and where it was fitted."""
    from cryowae.physics.crop import central_box, crop_of
    from cryowae.training.slab_noise import crop_noise

    settings = settings or LocalSpreadSettings()
    crop = central_box(np.shape(data), FIT_EDGE, even=True)
    d = crop_of(data, crop)
    task = extra_wedge_task(restore, d.numpy(), geometry, crop_noise(data, crop, geometry, d),
                            settings)
    model = fit_error_model(detail_power(task.restoration, settings), task.error_power,
                            task.noise_power, settings)
    return model, {"crop": [[c.start, c.stop] for c in crop],
                   "noise_power": task.noise_power}


def raw_gain_squared(detail: torch.Tensor, smoothed_variance: torch.Tensor,
                     model: ErrorModel, detail_mean: float | None = None) -> torch.Tensor:
    """v / G_w * V before normalisation: the model's shape on `detail` over the family's
    smoothed per-voxel variance (float64; a slab of a volume passes the volume's
    `detail_mean`)."""
    return model.shape(detail, detail_mean) / smoothed_variance.double().clamp_min(1e-30)


def normalising_factor(total_variance: float, weighted: float) -> float:
    """c with ``sum(c g^2 V) == sum(V)``: `total_variance` = sum(V), `weighted` =
    sum(g^2 V); 1 where either is not positive."""
    return total_variance / weighted if total_variance > 0 and weighted > 0 else 1.0


def local_gain(detail: torch.Tensor, family_variance: torch.Tensor, model: ErrorModel,
               settings: LocalSpreadSettings | None = None) -> torch.Tensor:
    """g(x) (float32, (Z, Y, X)): g^2 = c v / G_w * V, v = the model's shape on `detail`
    (the restoration's detail power), V = `family_variance` (the family's per-voxel
    variance): normalised (`normalising_factor`), clipped to
    [1 / max_gain^2, max_gain^2], normalised again, so that ``sum(g^2 V) == sum(V)``
    (the family's total variance is kept) and g stays within about the clip."""
    st = settings or LocalSpreadSettings()
    if detail.shape != family_variance.shape:
        raise CryowaeInputError("local spread: detail and family variance differ in shape")
    var = family_variance.double()
    total = float(var.sum())
    if not total > 0:
        return torch.ones(tuple(var.shape))
    floor = total / var.numel() * 1e-6
    g2 = raw_gain_squared(detail, gaussian_smooth(var, st.window_sigma).clamp_min(floor),
                          model)
    g2 = (g2 * normalising_factor(total, float((g2 * var).sum()))).clamp(
        st.max_gain**-2, st.max_gain**2)
    g2 = g2 * normalising_factor(total, float((g2 * var).sum()))
    return g2.sqrt().float()


def modulate(samples: torch.Tensor, mean: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``mean + gain (samples - mean)`` of an (S, Z, Y, X) family (in memory)."""
    return mean + gain * (samples - mean)


def family_variance(samples: torch.Tensor) -> torch.Tensor:
    """Per-voxel variance (ddof 1) of an (S, Z, Y, X) family, float64."""
    x = samples.double()
    return x.var(dim=0, unbiased=True)


def localise_family(samples: Any, restore: Callable[[np.ndarray], Any], data: Any,
                    geometry: TiltGeometry, centre: Any = None,
                    settings: LocalSpreadSettings | None = None
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The local step on an in-memory (S, Z, Y, X) family of `data` (Z, Y, X): fit the
    error model (`fit_on_crop`), take g from the detail power of `centre` (the
    restoration of `data`; default ``restore(data)``) and the family's variance, and
    modulate about the family mean. Returns the family and what was fitted (benchmarks
    and tests; `cryowae sample` streams the same steps:
    `cryowae.sampling.store_local_spread`)."""
    st = settings or LocalSpreadSettings()
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    model, fit = fit_on_crop(restore, data, geometry, st)
    r = np.asarray(restore(np.asarray(data, np.float32)) if centre is None else centre,
                   np.float32)
    gain = local_gain(detail_power(r, st), family_variance(x), model, st)
    mean = x.mean(dim=0)
    info = {"model": model.to_dict(), "fit": fit,
            "gain_range": [float(gain.min()), float(gain.max())]}
    return modulate(x, mean, gain), info


__all__ = ["FIT_EDGE", "ErrorModel", "ExtraWedgeTask", "LocalSpreadSettings",
           "detail_power", "extra_wedge_task", "family_variance", "fit_error_model",
           "fit_on_crop", "local_gain", "localise_family", "modulate", "normalising_factor",
           "raw_gain_squared"]
