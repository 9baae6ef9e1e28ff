"""Data consistency of posterior samples: keep what was measured, vary only the rest.

A sample restored tile by tile is blended first; consistency is then imposed on the
whole tomogram, so the Fourier grid is the tomogram's own and the measured region is
exactly the one of the tilt range (`cryowae.physics.wedge.wedge_mask`, rfft layout).

* ``hard``: the sample's Fourier coefficients in the measured region are replaced by
  those of the measured tomogram. The samples then agree with the data there to float
  rounding, and differ only in the missing wedge (and beyond Nyquist's sphere corners).
* ``soft``: noise-aware. In the measured region the coefficient becomes
  ``w(k) D(k) + (1 - w(k)) S(k)`` with ``w = snr / (1 + snr)`` per radial shell, the
  full tomogram's SNR estimated from the Fourier shell correlation of the even/odd
  halves *within the measured region*: ``snr_half = fsc / (1 - fsc)``, ``snr = 2
  snr_half`` (the full map averages both halves), so ``w = 2 fsc / (1 + fsc)``. Shells
  where the data are mostly noise keep the sample's (denoised) content. Without halves
  ``soft`` falls back to ``hard``, and the metadata says so.
* ``none``: no consistency (for comparisons).

For tomograms too large for one FFT, `impose_consistency_blockwise` applies the same in
overlapping cubic blocks blended with a cosine window (an approximation: the measured
region of a block's grid is that of the block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.fourier import hermitian_weights, masked_fsc, nyquist_sphere, shell_index
from cryowae.physics.wedge import wedge_mask

MODES = ("hard", "soft", "none")


def measured_fsc(even: Any, odd: Any, tilt_min: float, tilt_max: float,
                 tilt_axis: str = "y") -> np.ndarray:
    """FSC of the even and odd halves per radial shell, over the measured region only
    (`cryowae.physics.fourier.masked_fsc`, its shells and Hermitian weights)."""
    e = torch.from_numpy(np.array(even, dtype=np.float32))
    o = torch.from_numpy(np.array(odd, dtype=np.float32))
    if e.shape != o.shape or e.ndim != 3:
        raise CryowaeInputError(f"even/odd halves must be two (Z, Y, X) volumes of one shape, "
                                f"got {tuple(e.shape)} and {tuple(o.shape)}")
    shape = tuple(int(s) for s in e.shape)
    m = wedge_mask(shape, tilt_min, tilt_max, tilt_axis, rfft=True)
    return masked_fsc(e - e.mean(), o - o.mean(), m).numpy()


def soft_weights_from_fsc(fsc: np.ndarray) -> np.ndarray:
    """w = snr / (1 + snr) with snr = 2 fsc / (1 - fsc), i.e. 2 fsc / (1 + fsc)."""
    f = np.clip(np.nan_to_num(np.asarray(fsc, dtype=np.float64)), 0.0, 0.999)
    snr = 2 * f / (1 - f)
    return snr / (1 + snr)


@dataclass
class Consistency:
    """Measured-data consistency for samples of one tomogram (normalised units).

    Build it once with `prepare_consistency`; `apply(sample)` returns the consistent
    sample. Holds the measured spectrum (one rfft of the tomogram) and the weights.
    """

    mode: str  # effective mode: hard, soft or none
    requested: str
    reason: str
    shape: tuple[int, int, int]
    data_spec: torch.Tensor | None = None  # rfft of the measured tomogram
    weight: torch.Tensor | None = None  # rfft-layout weight of the data (0 in the wedge)
    shell_weights: np.ndarray | None = None  # soft: weight per shell

    def apply(self, sample: np.ndarray | torch.Tensor) -> np.ndarray:
        s = torch.from_numpy(np.require(sample, np.float32, ["W"]))
        if self.mode == "none":
            return s.numpy()
        assert self.data_spec is not None and self.weight is not None
        spec = torch.fft.rfftn(s)
        spec = spec + self.weight * (self.data_spec - spec)
        return torch.fft.irfftn(spec, s=self.shape).numpy().astype(np.float32, copy=False)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "requested": self.requested,
                               "reason": self.reason}
        if self.shell_weights is not None:
            out["shell_weights"] = [round(float(v), 4) for v in self.shell_weights]
        return out


def prepare_consistency(data: np.ndarray, mode: str, tilt_min: float, tilt_max: float,
                        tilt_axis: str = "y", even: Any = None, odd: Any = None
                        ) -> Consistency:
    """Precompute what `Consistency.apply` needs for tomogram `data` (Z, Y, X).

    `data` must be in the units the samples are in (cryowae uses normalised units).
    """
    if mode not in MODES:
        raise CryowaeInputError(f"unknown consistency {mode!r}: choose from {', '.join(MODES)}")
    shape = tuple(int(s) for s in data.shape)
    if mode == "none":
        return Consistency("none", mode, "no consistency requested", shape)  # type: ignore[arg-type]
    mask = wedge_mask(shape, tilt_min, tilt_max, tilt_axis, rfft=True)
    spec = torch.fft.rfftn(torch.from_numpy(np.array(data, dtype=np.float32)))
    if mode == "soft" and (even is None or odd is None):
        return Consistency("hard", "soft", "soft consistency needs --even and --odd halves; "
                           "used hard", shape, spec, mask)  # type: ignore[arg-type]
    if mode == "hard":
        return Consistency("hard", "hard", "measured region replaced by the data", shape,  # type: ignore[arg-type]
                           spec, mask)
    if tuple(np.shape(even)) != shape or tuple(np.shape(odd)) != shape:
        raise CryowaeInputError(f"even/odd halves {tuple(np.shape(even))}, "
                                f"{tuple(np.shape(odd))} must have the tomogram's shape {shape}")
    fsc = measured_fsc(even, odd, tilt_min, tilt_max, tilt_axis)
    sw = soft_weights_from_fsc(fsc)
    idx, _ = shell_index(shape)  # type: ignore[arg-type]
    weight = torch.as_tensor(sw, dtype=torch.float32)[idx] * mask
    weight[0, 0, 0] = 1.0  # the mean is the data's
    return Consistency("soft", "soft", "measured region blended with the data by "
                       "w = snr/(1+snr) per shell (snr from the even/odd FSC)", shape,  # type: ignore[arg-type]
                       spec, weight, sw)


def _cosine_ramp(n: int, overlap: int) -> np.ndarray:
    w = np.ones(n, dtype=np.float32)
    if overlap > 0:
        ramp = np.sin(0.5 * np.pi * (np.arange(overlap) + 0.5) / overlap) ** 2
        w[:overlap] = np.maximum(ramp, 1e-3)
        w[-overlap:] = np.maximum(ramp[::-1], 1e-3)
    return w


def _starts(n: int, block: int, overlap: int) -> list[int]:
    if n <= block:
        return [0]
    step = block - overlap
    s = list(range(0, n - block + 1, step))
    if s[-1] + block < n:
        s.append(n - block)
    return s


def impose_consistency_blockwise(sample: np.ndarray, data: np.ndarray, mode: str,
                                 tilt_min: float, tilt_max: float, tilt_axis: str = "y",
                                 block: int = 256, overlap: int = 64) -> np.ndarray:
    """Hard or soft-less (hard) consistency in overlapping blocks, blended with a cosine
    window: bounded memory for tomograms too large for one FFT. Approximate (each block's
    own Fourier grid); `Consistency.apply` is exact."""
    if mode == "none":
        return np.asarray(sample, dtype=np.float32)
    out = np.zeros(sample.shape, dtype=np.float32)
    wsum = np.zeros(sample.shape, dtype=np.float32)
    zs, ys, xs = (_starts(n, block, overlap) for n in sample.shape)
    for z in zs:
        for y in ys:
            for x in xs:
                sl = (slice(z, z + block), slice(y, y + block), slice(x, x + block))
                d = np.asarray(data[sl], dtype=np.float32)
                c = prepare_consistency(d, "hard", tilt_min, tilt_max, tilt_axis)
                res = c.apply(np.asarray(sample[sl], dtype=np.float32))
                win = np.einsum("i,j,k->ijk", *(_cosine_ramp(s, min(overlap, s // 2))
                                                for s in res.shape))
                out[sl] += res * win
                wsum[sl] += win
    return out / wsum


def fourier_region_energy(volume: np.ndarray | torch.Tensor, tilt_min: float,
                          tilt_max: float, tilt_axis: str = "y",
                          mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean energy per Fourier voxel of `volume` in the missing wedge and in the measured
    region, both within |k| <= 0.5 and without DC (full-spectrum counting)."""
    v = torch.from_numpy(np.array(volume, dtype=np.float32))
    shape = tuple(int(s) for s in v.shape)
    spec = torch.fft.rfftn(v)
    if mask is None:
        mask = wedge_mask(shape, tilt_min, tilt_max, tilt_axis, rfft=True)
    return region_energy_of_spectrum(spec, mask, shape)  # type: ignore[arg-type]


def region_energy_of_spectrum(spec: torch.Tensor, mask: torch.Tensor,
                              shape: tuple[int, int, int]) -> tuple[float, float]:
    """(wedge, measured) mean |F|^2 per Fourier voxel of the rfft spectrum of a volume of
    `shape`; see `fourier_region_energy`."""
    inside = nyquist_sphere(shape)
    w = hermitian_weights(shape[-1], torch.float64).expand(spec.shape)
    p = spec.abs().square().double() * w
    meas = inside & (mask > 0.5)
    wedge = inside & (mask <= 0.5)
    e_w = float(p[wedge].sum() / w[wedge].sum()) if wedge.any() else float("nan")
    e_m = float(p[meas].sum() / w[meas].sum()) if meas.any() else float("nan")
    return e_w, e_m


def noise_std_from_halves(full: Any, even: Any, odd: Any, box: int = 5) -> np.ndarray:
    """Per-voxel standard deviation of the full tomogram's noise, from its halves.

    With independent noise in the halves and ``full ~ c (even + odd)`` (c = 1/2 for an
    average, 1 for a sum; fitted by least squares), the noise of the full tomogram is
    ``c (n_e + n_o)``, whose variance ``c^2 E[(e - o)^2]`` is estimated by averaging
    ``c^2 (e - o)^2`` over a `box`^3 neighbourhood. Hard consistency puts this noise,
    identically, into every sample, so the family's own spread never shows it; add the
    two variances for the total per-voxel uncertainty. No ground truth is involved.
    """
    f = np.asarray(full, dtype=np.float64)
    e = np.asarray(even, dtype=np.float32)
    o = np.asarray(odd, dtype=np.float32)
    if e.shape != f.shape or o.shape != f.shape:
        raise CryowaeInputError(f"even/odd halves {e.shape}, {o.shape} must have the "
                                f"tomogram's shape {f.shape}")
    s = e.astype(np.float64) + o
    sc, fc = s - s.mean(), f - f.mean()
    c = float((sc * fc).sum() / max((sc * sc).sum(), 1e-300))
    d = torch.from_numpy(((c * (e - o)) ** 2).astype(np.float32))[None, None]
    v = torch.nn.functional.avg_pool3d(d, box, stride=1, padding=box // 2,
                                       count_include_pad=False)[0, 0]
    return v.sqrt().numpy()
