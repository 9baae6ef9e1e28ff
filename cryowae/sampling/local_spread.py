"""Local spread of a posterior family: where in the tomogram the family should vary
(issue 21, item 2).

The per-shell recalibration (`cryowae.sampling.recalibrate`) is a stationary filter: it
sets how much the family varies per resolution shell and Fourier region, not where.
This module modulates each sample's deviation from the family mean m by a spatial gain
g(x),

    X_s'' = m + g(x) (X_s' - m),      g^2(x) = k v(x) / V(x),

V the family's per-voxel variance (ddof 1) and k the constant that keeps the family's
total variance sum_x V (so the per-shell calibration's overall spread stands). The
family's per-voxel variance becomes k v(x) wherever g stays within its clip
[1 / max_gain, max_gain]: the std map is the error model's, not the 16-sample
variance's noise (a ratio to a smoothed V lets that noise into the map's order).

The error model is relative: the restoration R's error variance grows with the local
power of R, weighted towards what the data measured of it,

    F(x) = G_s * (F^-1[1_M F(R - mean R)])^2,     P(x) = G_s * (R - mean R)^2,
    H(x) = F(x)^(1 - a) P(x)^a,                   v(x) = (H(x) / mean H)^b,

M the measured region of the tilt geometry (a mask: the FFT's normalisation cancels),
G_s a Gaussian of `feature_sigma` voxels, a = `total_weight`. Where the data show
structure, the restoration can be wrong (wedge-smeared edges, tops and bottoms); in
empty ice it has little to get wrong. F alone (a = 0) misses the errors of structure
whose content lies mostly in the wedge; P alone (a = 1) ranks noise the restorer
invented in empty planes as high as measured structure: on the development pipelines
their geometric mean ranks the errors better than either (docs/benchmarks.md, "The
high-frequency tail and the total power"). The exponent b (`exponent`) is a setting,
not fitted: the self-supervised extra-wedge task's error in its band is mostly the
data's noise and does not resolve b (docs/benchmarks.md, "Local spread on the
development pipelines").

Smoothing: `cryowae.metrics.sparsification.gaussian_smooth` (mirrored edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.sparsification import gaussian_smooth
from cryowae.physics.geometry import TiltGeometry

_DIMS = (-3, -2, -1)


@dataclass(frozen=True)
class LocalSpreadSettings:
    """Settings of the local spread, and of the self-check and its extra-wedge task
    (`cryowae.sampling.extra_wedge`), which `cryowae sample` records with them.

    feature_sigma
        Width (voxels) of the Gaussian that averages the squares of the measured
        component and of the restoration into F and P.
    total_weight
        a of the feature H = F^(1 - a) P^a (0: the measured power alone).
    exponent
        b of the error model v = (H / mean H)^b (b = 1: the error's local power is a
        fixed fraction of H).
    max_gain
        g is kept within [1 / max_gain, max_gain].
    window_sigma
        Width (voxels) of the extra-wedge task's local error power and of the
        self-check's smoothing of the family's variance.
    rotation_deg
        Rotation (degrees, about Z) of the second wedge of the extra-wedge task.
    border
        Voxels at each face of the self-check's crop left out of its local rank
        correlation (reflected smoothing and the crop's box edges).
    enabled
        Whether `cryowae sample` applies the step (``--no-local-spread`` turns it off);
        the in-memory functions here ignore it.
    """

    feature_sigma: float = 1.0
    total_weight: float = 0.5
    exponent: float = 1.0
    max_gain: float = 8.0
    window_sigma: float = 3.0
    rotation_deg: float = 90.0
    border: int = 6
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("feature_sigma", "window_sigma", "max_gain"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise CryowaeInputError(f"local spread: {name} must be > 0, got {v}")
        if self.max_gain < 1:
            raise CryowaeInputError(f"local spread: max_gain must be >= 1, got {self.max_gain}")
        if not (math.isfinite(self.total_weight) and 0 <= self.total_weight <= 1):
            raise CryowaeInputError("local spread: total_weight must be within [0, 1], "
                                    f"got {self.total_weight}")
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise CryowaeInputError(f"local spread: exponent must be >= 0, got {self.exponent}")
        if not math.isfinite(self.rotation_deg):
            raise CryowaeInputError("local spread: rotation_deg must be finite")
        if self.border < 0:
            raise CryowaeInputError(f"local spread: border must be >= 0, got {self.border}")

    def describe(self) -> dict[str, Any]:
        """The settings as ``family.json`` and the resume fingerprint record them."""
        return {"enabled": self.enabled, "feature_sigma": self.feature_sigma,
                "total_weight": self.total_weight, "exponent": self.exponent,
                "max_gain": self.max_gain, "window_sigma": self.window_sigma,
                "rotation_deg": self.rotation_deg, "border": self.border}


#: bytes of complex64 planes transformed at once by `measured_square`
BLOCK_BYTES = 16 << 20


def _z_step(shape: tuple[int, ...]) -> int:
    """Z planes of float64 read at once: `BLOCK_BYTES` worth."""
    return max(1, BLOCK_BYTES // max(1, 8 * shape[1] * shape[2]))


def _volume_mean(volume: Any) -> float:
    """Mean of a (Z, Y, X) array-like (a memory map, a zarr array), summed in float64
    Z slab by Z slab."""
    shape = tuple(int(v) for v in np.shape(volume))
    zstep = _z_step(shape)
    return sum(float(np.asarray(volume[z:z + zstep], np.float64).sum())
               for z in range(0, shape[0], zstep)) / float(np.prod(shape))


def measured_square(restoration: Any, geometry: TiltGeometry, out: Any) -> Any:
    """(F^-1[1_M F(R - mean R)])^2 of a (Z, Y, X) restoration into `out` (an array of
    the same shape, float32 or float64, written block by block), and `out`.

    The measured region of a single-axis tilt about Y depends on (kz, kx) only (about
    X: on (kz, ky)), so the 3D filter is the same 2D filter on every plane that holds
    Z and the other in-plane axis: blocks of such planes are transformed one at a time,
    and memory is a block, not the volume."""
    shape = tuple(int(v) for v in np.shape(restoration))
    if len(shape) != 3:
        raise CryowaeInputError(f"local spread: expected a (Z, Y, X) volume, got {shape}")
    axis = 1 if geometry.axis == "y" else 2  # the tilt axis: planes are taken along it
    planes = (0, 2) if axis == 1 else (0, 1)
    plane_shape = tuple(1 if i == axis else n for i, n in enumerate(shape))
    mask = geometry.wedge_mask(plane_shape, rfft=False) > 0.5
    step = max(1, BLOCK_BYTES // max(1, 8 * shape[0] * shape[3 - axis]))
    mean = _volume_mean(restoration)
    for lo in range(0, shape[axis], step):
        block = (slice(None), slice(lo, lo + step), slice(None)) if axis == 1 else (
            slice(None), slice(None), slice(lo, lo + step))
        r = torch.as_tensor(np.asarray(restoration[block], np.float32)) - np.float32(mean)
        comp = torch.fft.ifftn(torch.fft.fftn(r, dim=planes) * mask, dim=planes).real
        out[block] = (comp * comp).numpy()
    return out


def measured_power(restoration: Any, geometry: TiltGeometry,
                   settings: LocalSpreadSettings | None = None) -> torch.Tensor:
    """F = G_s * (measured component)^2 of a (Z, Y, X) restoration held in memory
    (module docstring), float64."""
    st = settings or LocalSpreadSettings()
    square = measured_square(restoration, geometry,
                             np.empty(np.shape(restoration), np.float64))
    return gaussian_smooth(torch.from_numpy(square), st.feature_sigma).double()


def total_square(restoration: Any, out: Any) -> Any:
    """(R - mean R)^2 of a (Z, Y, X) restoration into `out` (same shape, written Z slab by
    Z slab), and `out`."""
    shape = tuple(int(v) for v in np.shape(restoration))
    zstep = _z_step(shape)
    mean = _volume_mean(restoration)
    for z in range(0, shape[0], zstep):
        out[z:z + zstep] = np.square(np.asarray(restoration[z:z + zstep], np.float64) - mean)
    return out


def combine_powers(measured: Any, total: Any, settings: LocalSpreadSettings) -> np.ndarray:
    """H = F^(1 - a) P^a (float64) of the smoothed measured and total powers (module
    docstring), elementwise: whole volumes or matching slabs."""
    a = settings.total_weight
    f = np.clip(np.asarray(measured, dtype=np.float64), 0.0, None)
    p = np.clip(np.asarray(total, dtype=np.float64), 0.0, None)
    if a == 0:
        return f
    if a == 1:
        return p
    return f ** (1.0 - a) * p**a


def local_feature(restoration: Any, geometry: TiltGeometry,
                  settings: LocalSpreadSettings | None = None) -> torch.Tensor:
    """H of a (Z, Y, X) restoration held in memory (module docstring), float64."""
    st = settings or LocalSpreadSettings()
    shape = np.shape(restoration)
    total = gaussian_smooth(torch.from_numpy(total_square(restoration, np.empty(
        shape, np.float64))), st.feature_sigma).double()
    return torch.from_numpy(combine_powers(measured_power(restoration, geometry, st),
                                           total, st))


def raw_gain_squared(feature: Any, variance: Any, settings: LocalSpreadSettings,
                     feature_mean: float, variance_floor: float) -> torch.Tensor:
    """v / V before normalisation, v = (H / `feature_mean`)^b (float64; a slab of a
    volume passes the volume's mean of H and its floor of V)."""
    f = torch.as_tensor(np.asarray(feature, dtype=np.float64))
    var = torch.as_tensor(np.asarray(variance, dtype=np.float64)).clamp_min(variance_floor)
    v = (f / max(float(feature_mean), 1e-300)).clamp_min(1e-12) ** settings.exponent
    return v / var


def normalising_factor(total_variance: float, weighted: float) -> float:
    """c with ``sum(c g^2 V) == sum(V)``: `total_variance` = sum(V), `weighted` =
    sum(g^2 V); 1 where either is not positive."""
    return total_variance / weighted if total_variance > 0 and weighted > 0 else 1.0


def variance_floor(total_variance: float, voxels: int) -> float:
    """The smallest V the gain divides by: 1e-6 of the mean variance."""
    return total_variance / max(voxels, 1) * 1e-6


def local_gain(feature: torch.Tensor, family_variance: torch.Tensor,
               settings: LocalSpreadSettings | None = None) -> torch.Tensor:
    """g(x) (float32, (Z, Y, X)): g^2 = k v / V (module docstring), v from the
    feature H (`local_feature`), V = `family_variance` (per voxel): normalised
    (`normalising_factor`), clipped to [1 / max_gain^2, max_gain^2], normalised again,
    so that ``sum(g^2 V) == sum(V)`` and g stays within about the clip."""
    st = settings or LocalSpreadSettings()
    if feature.shape != family_variance.shape:
        raise CryowaeInputError("local spread: feature and family variance differ in shape")
    var = family_variance.double()
    total = float(var.sum())
    if not total > 0:
        return torch.ones(tuple(var.shape))
    g2 = raw_gain_squared(feature, var, st, float(feature.double().mean()),
                          variance_floor(total, var.numel()))
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


def localise_family(samples: Any, centre: Any, geometry: TiltGeometry,
                    settings: LocalSpreadSettings | None = None
                    ) -> tuple[torch.Tensor, dict[str, Any]]:
    """The local step on an in-memory (S, Z, Y, X) family: g from the feature H
    of `centre` (the restoration the family is centred on, (Z, Y, X)) and the family's
    variance, applied about the family mean. Returns the family and the gain's range
    (benchmarks and tests; `cryowae sample` streams the same steps:
    `cryowae.sampling.store_local_spread`)."""
    st = settings or LocalSpreadSettings()
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    gain = local_gain(local_feature(centre, geometry, st), family_variance(x), st)
    info = {"gain_range": [float(gain.min()), float(gain.max())]}
    return modulate(x, x.mean(dim=0), gain), info


__all__ = ["BLOCK_BYTES", "LocalSpreadSettings", "combine_powers", "family_variance",
           "local_feature", "local_gain", "localise_family", "measured_power",
           "measured_square", "modulate", "normalising_factor", "raw_gain_squared",
           "total_square", "variance_floor"]
