"""The data's noise power per shell from the empty slabs above and below the specimen.

A tomogram is reconstructed thicker than its specimen: the planes near its Z faces hold
no structure, only the reconstruction of the tilt images' noise. Their power per shell
of the measured region is the noise power of the whole tomogram, whatever filter the
reconstruction applied (ramp, apodization, SIRT-like weighting, Fourier insertion,
dose weighting): no model of the noise's frequency dependence is needed, and no halves.

Finding the slabs (`find_empty_slabs`): the tomogram is low-passed by a Gaussian of
`SlabSettings.smoothing` voxels (`cryowae.metrics.streaks.gaussian_lowpass`), which keeps
the specimen's structure and removes most of the noise, whose power grows with
frequency; the variance of each Z plane of the low-passed volume is its structure
profile p(z). The floor is the smallest p of the running 3-plane mean; a plane is empty
when p(z) <= `empty_factor` x floor, and a slab is the run of empty planes from a face
inwards, less `guard` planes next to the specimen (whose back-projection streaks reach
a little beyond it); a slab thinner than `min_slab` planes is not used (it resolves
too little of kz, and sits next to the specimen: a specimen that nearly fills the
tomogram, as in `cryowae simulate`, leaves a few quiet planes at its faces). No estimate
is made (the reason in one line) when no slab is left, or when the specimen's planes
(the rest) are not at least `contrast` x floor in median: then the quietest planes are
not told apart from the structure.

Power in a slab (`slab_noise`): a slab of L planes is tapered along Z by the sine window
w(z) = sin(pi (z + 1/2) / L), scaled to ``sum w^2 = L``, and transformed (ortho rfft on
its own (L, Y, X) grid). A window of L planes blurs the spectrum along kz: for noise of
power S(k) the expected periodogram at kz_j is

    E|F(kz_j)|^2 = (1 / L) int S(kz, ky, kx) |D(kz_j - kz)|^2 dkz,
    D(f) = sum_z w(z) exp(-2 pi i f z),

which mixes measured coefficients with the empty missing wedge near its edges. The
estimate takes S(k) = N(|k|) M(k) (M: the measured region of the continuous Fourier
space, ``TiltGeometry.wedge_mask`` on a grid of `FINE_KZ` x L kz samples; N constant over a
shell and over the window's kz width of about 1 / L), computes the reference R(k) = the
same integral with N = 1, and per shell of the measured region

    N(shell) = sum |F(k)|^2 / sum R(k),

summed over both slabs (full-spectrum multiplicities). The result is interpolated onto
the shells of the tomogram's grid (`shell_frequencies`). Below about 2 / L cycles per
voxel the slab does not resolve kz, and N is not constant across the window there: the
estimate mixes in higher frequencies (too high where the noise rises with frequency, as
a ramp's does). No isotropic model of N undoes this, since weighted back-projection's
noise grows with the distance from the tilt axis, not with |k|.

What it assumes: the noise is stationary along Z, i.e. the empty planes carry the same
noise as the specimen's. True for a linear reconstruction of images whose noise does not
depend on the specimen: the CTF correction (flipped or none) and dose weighting act on
the images before back-projection and filter the noise of every plane alike, so the
estimate is the noise as reconstructed, those filters included (what a restoration
sees). It fails where the reconstruction weights planes differently: a strong gridding
correction along Z, or a field of view narrower than the projected slab (rays leaving
the detector near the Z faces at high tilt lower the noise there: read the central
Y, X column of a wide tomogram). Counting noise is Poisson, so its power follows the
transmitted dose; rays through the slabs pass through the specimen too, so the
difference is small. Signal that leaks into the slabs (back-projection streaks of the
missing wedge, fiducials, contamination) makes the estimate too high, most at low
frequency. benchmarks/bench_noise.py checks it against the exact noise of every
pipeline of the simulator (`cryowae.simulation.pipelines`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor
from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
from cryowae.metrics.streaks import gaussian_lowpass
from cryowae.physics.crop import Box
from cryowae.physics.geometry import TiltGeometry
from cryowae.training.noise import NoiseSpectrum, measured_shell_power, noise_without_halves

#: kz samples per slab plane on which the reference integral over kz is evaluated
FINE_KZ = 16
#: at most this many kz samples (at least 4 per plane): bounds the fine mask's memory
MAX_FINE = 1024
_DIMS = (-3, -2, -1)


@dataclass(frozen=True)
class SlabSettings:
    """How empty slabs are found (module docstring); validated when made.

    Attributes
    ----------
    smoothing
        Gaussian sigma (voxels) of the low-pass whose per-plane variance is the
        structure profile.
    empty_factor
        A plane is empty when its profile is at most this times the floor (> 1).
    contrast
        The specimen planes' median profile must be at least this times the floor (> 1).
    guard
        Planes left out between the specimen and each slab (>= 0).
    min_slab
        Fewest planes of a slab that is used (>= 4).
    """

    smoothing: float = 2.0
    empty_factor: float = 2.5
    contrast: float = 3.0
    guard: int = 2
    min_slab: int = 8

    def __post_init__(self) -> None:
        if not (math.isfinite(self.smoothing) and self.smoothing > 0):
            raise CryowaeInputError(f"slab smoothing must be positive, got {self.smoothing:g}")
        if not self.empty_factor > 1 or not self.contrast > 1:
            raise CryowaeInputError("slab empty_factor and contrast must exceed 1, got "
                                    f"{self.empty_factor:g} and {self.contrast:g}")
        if int(self.guard) < 0 or int(self.min_slab) < 4:
            raise CryowaeInputError(f"slab guard must be >= 0 and min_slab >= 4, got "
                                    f"{self.guard} and {self.min_slab}")


@dataclass(frozen=True)
class EmptySlabs:
    """The empty slabs of a tomogram, or why there are none.

    Attributes
    ----------
    slabs
        Z slices (bottom and/or top), each at least `SlabSettings.min_slab` planes;
        empty when none was found.
    profile
        The structure profile p(z) (variance of each low-passed Z plane), (Z,).
    floor
        Its floor (module docstring).
    reason
        Empty when slabs were found; else one line saying why not.
    """

    slabs: tuple[slice, ...]
    profile: np.ndarray
    floor: float
    reason: str = ""


def find_empty_slabs(volume: Any, settings: SlabSettings | None = None) -> EmptySlabs:
    """The empty Z slabs at the faces of a (Z, Y, X) tomogram (module docstring)."""
    s = settings or SlabSettings()
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    low = gaussian_lowpass(v.double() - v.double().mean(), s.smoothing)
    prof = low.var(dim=(1, 2)).numpy()
    nz = prof.size
    run = np.convolve(prof, np.ones(3) / 3, mode="valid") if nz >= 3 else prof
    floor = float(run.min())
    empty = prof <= s.empty_factor * floor
    lo = int(np.argmin(empty)) if not empty.all() else nz  # first non-empty plane
    hi = nz - int(np.argmin(empty[::-1])) if not empty.all() else 0
    slabs = tuple(sl for sl in (slice(0, lo - s.guard), slice(hi + s.guard, nz))
                  if sl.stop - sl.start >= s.min_slab)
    quiet = (lo - s.guard, nz - hi - s.guard)  # usable planes at each face
    inner = prof[lo:hi]
    ratio = float(np.median(inner)) / floor if inner.size and floor > 0 else float("nan")
    reason = ""
    if inner.size == 0:
        reason = (f"no Z structure contrast: every plane is within {s.empty_factor:g}x "
                  "the quietest (structure everywhere or nowhere)")
    elif not slabs:
        reason = (f"no empty slab of {s.min_slab} planes at the Z faces ({max(quiet[0], 0)} "
                  f"and {max(quiet[1], 0)} quiet planes beyond the guard)")
    elif not ratio >= s.contrast:
        reason = (f"no Z structure contrast: the specimen planes are {ratio:.2g}x the "
                  f"quietest, below {s.contrast:g}x")
    return EmptySlabs(slabs if not reason else (), prof, floor, reason)


def _sine_window(n: int) -> torch.Tensor:
    """sin(pi (z + 1/2) / n), scaled to sum w^2 = n (float64 (n,))."""
    w = torch.sin(math.pi * (torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return w * math.sqrt(n / float(w.square().sum()))


#: a Fourier region as a function of a (Z, Y, X) grid: its rfft mask (1 inside)
Region = Callable[[tuple[int, int, int]], torch.Tensor]


class _Slab:
    """One tapered slab: its observed power per shell of a Fourier region (default:
    the measured region) and its reference R (module docstring)."""

    def __init__(self, box: torch.Tensor, geometry: TiltGeometry,
                 region: Region | None = None) -> None:
        n_z, n_y, n_x = (int(n) for n in box.shape)
        w = _sine_window(n_z)
        spec = torch.fft.rfftn((box - box.mean()) * w[:, None, None], dim=_DIMS,
                               norm="ortho").abs().square()
        mask: Region = region or (lambda shp: geometry.wedge_mask(shp, rfft=True))
        self.grid = SpectralGrid.of((n_z, n_y, n_x), geometry)
        self.region = mask((n_z, n_y, n_x)) > 0.5
        self.freq = shell_frequencies((n_z, n_y, n_x))
        self.observed = self.grid.shell_sums(spec, self.region)
        per_plane = max(4, min(FINE_KZ, MAX_FINE // n_z))
        g = per_plane * n_z
        fine_shape = (g, n_y, n_x)
        self.fine_mask = mask(fine_shape).double().reshape(g, -1)
        # |D|^2 on the fine grid (zero-padded FFT of the window); kz_j - kz_g falls on it
        d2 = torch.fft.fft(w, n=g).abs().square()
        diff = (torch.arange(n_z)[:, None] * per_plane - torch.arange(g)[None, :]) % g
        self.kernel = d2[diff] / (n_z * g)  # (L, G): the integral over kz as a sum
        self.rshape = (n_z, n_y, n_x // 2 + 1)

    def reference(self) -> np.ndarray:
        """R per shell of the measured region: the expected shell sums of the tapered
        slab's power for noise of unit power in the measured region."""
        return self.grid.shell_sums((self.kernel @ self.fine_mask).reshape(self.rshape),
                                    self.region)


def slab_noise(volume: Any, slabs: tuple[slice, ...], geometry: TiltGeometry,
               region: Region | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Noise power per shell of the measured region (or of `region`, a part of it: the
    noise need not be isotropic within a shell) from the given Z slabs of a (Z, Y, X)
    volume, on the volume's shells (`shell_frequencies`), and the reference sum per
    shell (how many coefficients' worth of noise each shell holds; 0: none).
    """
    v = as_tensor(volume, "volume")
    freq = shell_frequencies(v.shape)
    est, weight = np.zeros(freq.size), np.zeros(freq.size)
    for sl in slabs:
        part = _Slab(v[sl].double(), geometry, region)
        ref = part.reference()
        ok = ref > 0
        if ok.sum() < 2:
            continue
        r = np.interp(freq, part.freq[ok], ref[ok])
        est += np.interp(freq, part.freq[ok], part.observed[ok] / ref[ok]) * r
        weight += r
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, est / weight, 0.0), weight


def column_box(shape: Sequence[int], box: Box) -> Box:
    """The column of a crop `box` of a (Z, Y, X) volume of `shape`: all Z planes, the
    box's Y and X (where the empty slabs of a crop's tomogram are looked for)."""
    return (slice(0, int(shape[0])), box[1], box[2])


def column_of(data: Any, box: Box) -> torch.Tensor:
    """The column (`column_box`) of the crop `box` of a whole (Z, Y, X) tomogram `data`
    (array-like), read as a float32 tensor; nothing else of `data` is read."""
    from cryowae.physics.crop import crop_of

    return crop_of(data, column_box(np.shape(data), box))


def noise_from_empty_slabs(volume: Any, measured: TiltGeometry | torch.Tensor,
                           settings: SlabSettings | None = None,
                           column: Any = None, region: Region | None = None
                           ) -> NoiseSpectrum:
    """Noise power per shell of the measured region, on `volume`'s shells and in its
    units, from the empty Z slabs (module docstring) of `column`: the tomogram's planes
    over `volume`'s Y, X box (`column_box`; None: `volume` itself, which must then hold
    all Z planes). Capped, as the ramp fit is, by `volume`'s measured power per shell
    (noise cannot exceed the total).

    `region` (a part of the measured region as a function of the grid, `Region`): the
    noise power per shell in that part only, capped by the data's power there.

    Without empty slabs, or with a measured mask instead of a `TiltGeometry` (the slab's
    grid needs the tilt range), returns `noise_without_halves(volume)` (the ramp fit,
    isotropic within a shell), saying why in `NoiseSpectrum.source`.
    """
    v = as_tensor(volume, "volume")
    if not isinstance(measured, TiltGeometry):
        reason = "a measured mask, not a tilt geometry, was given"
    else:
        col = v if column is None else as_tensor(column, "column")
        found = find_empty_slabs(col, settings)
        reason = found.reason
        if not reason:
            est, _ = slab_noise(col, found.slabs, measured, region)
            freq = shell_frequencies(v.shape)
            # the cap: the data's own power per shell in the same region
            power, count = measured_shell_power(
                v, measured if region is None else region(tuple(v.shape)) > 0.5)
            est = np.interp(freq, shell_frequencies(col.shape), est)
            est = np.where(count > 0, np.minimum(est, np.nan_to_num(power, nan=np.inf)), est)
            planes = "+".join(f"{sl.start}-{sl.stop - 1}" for sl in found.slabs)
            where = "" if region is None else ", in a part of the measured region"
            return NoiseSpectrum(freq, est, f"empty Z slabs (planes {planes} of "
                                            f"{col.shape[0]}{where})")
    ramp = noise_without_halves(v, measured)
    return NoiseSpectrum(ramp.frequency, ramp.power, f"{ramp.source} ({reason})")


def crop_noise(data: Any, box: Box, geometry: TiltGeometry | torch.Tensor,
               crop: torch.Tensor | None = None) -> NoiseSpectrum:
    """The no-halves noise estimate of the crop `box` of a whole (Z, Y, X) tomogram
    `data` (array-like; only the box's column is read): `noise_from_empty_slabs` with
    the slabs looked for in the column (`column_box`). `crop`: the box, already read."""
    from cryowae.physics.crop import crop_of

    c = crop_of(data, box) if crop is None else crop
    return noise_from_empty_slabs(c, geometry, column=column_of(data, box))


__all__ = ["EmptySlabs", "Region", "SlabSettings", "column_box", "column_of", "crop_noise",
           "find_empty_slabs", "noise_from_empty_slabs", "slab_noise"]
