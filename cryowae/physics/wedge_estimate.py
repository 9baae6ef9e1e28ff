"""Estimate the tilt axis and the measured angular range from a tomogram's own spectrum.

A reconstructed tilt series carries power only in the directions of Fourier space its
projections sampled (`cryowae.physics.wedge`): every coefficient whose elevation out of
the plane of the tilt axis lies in [tilt_min, tilt_max] degrees. The estimate reads a
central crop of at most 128^3 voxels (a memory-mapped tomogram is never loaded whole),
tapers it with a Hann window, and looks at the power of its coefficients between
0.06 and 0.42 cycles per voxel (`BAND`: away from DC, where the window's blur spans tens
of degrees, and from Nyquist), each divided by the mean power of its radial shell (so
the radial fall-off and CTF rings cancel):

1. The signal band. The *floor* is the median shell power between 0.42 and 0.5 cycles
   per voxel; the shells of `BAND` whose mean power is at least `SIGNAL_FACTOR` times
   the floor hold signal (binned or low-passed tomograms have almost none above 0.25
   cycles per voxel, and there the measured and the missing region hold noise alike).
   With fewer than `MIN_SIGNAL_SHELLS` such shells (a flat spectrum: white noise, or a
   wedge cut out of it) the whole `BAND` is used.
2. For each candidate axis, the coefficients of the signal band are binned by their
   elevation (1 degree bins, the sign convention of `wedge_mask` for the same axis) and
   the contiguous range of bins that best splits the log power in two (Otsu: largest
   between-class variance) is found. The candidates: ``"y"`` and ``"x"`` (beam along
   Z) and ``"z"``: the tilt axis along the file's Z and the beam along its Y, i.e. Y
   and Z swapped (an IMOD reconstruction that was not rotated); for ``"z"`` the
   elevation is ``atan(ky / kx)``, that of the volume with Y and Z transposed about the
   Y tilt axis.
3. The log-domain split lies too far out (power leaking into the wedge through the
   window's blur is small but far above the wedge's floor), so each edge is then placed
   where the linear-power profile of all of `BAND` (where the blur is narrowest at high
   |k|) falls from the plateau just inside the edge to the floor of the wedge: the
   plateau's width equivalent of the profile from 19 degrees inside the edge outwards,
   after each bin is capped at the plateau and the profile averaged over 5 bins (the
   streaks of the outermost tilts, a peak at the edge in real tomograms, cannot spill
   outwards).
4. The decision: the coefficients of the signal band whose elevation lies 8 to 20
   degrees (`EDGE_WINDOW`) inside or outside either edge. Their log power's share of
   variance explained by inside/outside is the *separation* (0..1), the difference of
   the two classes' means the *decades* (log10 of the ratio of geometric mean powers).
   Comparing the two sides of the edges, not the whole range, a specimen whose
   spectrum falls off smoothly with the elevation does not read as a wedge. The axis
   with the largest separation is the estimate; `WedgeEstimate.reliable` needs a
   separation of at least 0.3 and at least 0.5 decades.

Figures on simulated and real tomograms are in docs/benchmarks.md ("Wedge estimate").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryowae.physics.fourier import fourier_grid, hermitian_weights, shell_index
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import _elevation_deg

#: side of the central crop the estimate reads (voxels, each axis at most)
CROP_SIZE = 128
#: band of |k| the estimate reads, cycles per voxel (away from DC and Nyquist)
BAND = (0.06, 0.42)
#: shells whose median mean power is the floor, cycles per voxel
FLOOR_BAND = (0.42, 0.5)
#: a shell holds signal when its mean power is at least this many times the floor
SIGNAL_FACTOR = 3.0
#: fewer signal shells than this: the whole BAND decides (a flat spectrum)
MIN_SIGNAL_SHELLS = 3
#: degrees from an edge (from, to) of the coefficients that decide (step 4)
EDGE_WINDOW = (8.0, 20.0)
#: elevation bins over [-90, 90) degrees
N_BINS = 180
#: bins the edge profile is averaged over (odd)
PROFILE_BINS = 5
#: candidate tilt axes of the file; "z": Y and Z swapped
CANDIDATE_AXES = ("y", "x", "z")
#: thresholds of `WedgeEstimate.reliable`
RELIABLE_SEPARATION = 0.3
RELIABLE_DECADES = 0.5
#: edges are clipped to this magnitude (TiltGeometry needs |angle| < 90)
MAX_ANGLE = 89.0


@dataclass(frozen=True)
class WedgeEstimate:
    """The wedge a tomogram's spectrum shows.

    Attributes
    ----------
    axis
        ``"y"``, ``"x"`` or ``"z"`` (tilt axis along the file's Z: Y and Z swapped).
    tilt_min, tilt_max
        Edges of the measured range, degrees (convention of `wedge_mask`).
    separation
        Share (0..1) of the variance of the log power near the edges explained by
        inside/outside the measured range (module docstring, step 4).
    decades
        log10 of the ratio of the geometric mean powers inside and outside the edges.
    separation_by_axis
        The separation of each candidate axis.
    band
        The signal band the decision read, (lowest, highest) |k| in cycles per voxel.
    """

    axis: str
    tilt_min: float
    tilt_max: float
    separation: float
    decades: float
    separation_by_axis: dict[str, float] = field(default_factory=dict)
    band: tuple[float, float] = BAND

    @property
    def swapped(self) -> bool:
        """True when the wedge lies in the file's YX plane (Y and Z swapped)."""
        return self.axis == "z"

    @property
    def reliable(self) -> bool:
        """True when the spectrum shows a clear missing wedge."""
        return self.separation >= RELIABLE_SEPARATION and self.decades >= RELIABLE_DECADES

    def geometry(self, axis: str | None = None, source: str = "estimated from the "
                 "tomogram's Fourier power") -> TiltGeometry:
        """The estimate as a `TiltGeometry` (about `axis`, default the estimated one;
        an estimate about Z needs an explicit ``"y"`` or ``"x"``)."""
        return TiltGeometry(round(self.tilt_min, 1), round(self.tilt_max, 1),
                            axis or self.axis, source)

    def figures(self) -> str:
        """``separation 0.83, 5.1 decades, 0.06-0.42 cycles/voxel``."""
        return (f"separation {self.separation:.2f}, {self.decades:.1f} decades, "
                f"{self.band[0]:.2f}-{self.band[1]:.2f} cycles/voxel")

    def describe(self) -> str:
        """One line: ``-61.0..61.0 degrees about Y (separation 0.83, 5.1 decades,
        0.17-0.28 cycles/voxel)``."""
        return (f"{self.tilt_min:.1f}..{self.tilt_max:.1f} degrees about "
                f"{self.axis.upper()} ({self.figures()})")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (``tilt_axis`` upper case)."""
        return {"tilt_axis": self.axis.upper(), "tilt_min": round(self.tilt_min, 2),
                "tilt_max": round(self.tilt_max, 2), "separation": round(self.separation, 4),
                "decades": round(self.decades, 3), "reliable": self.reliable,
                "swapped_yz": self.swapped,
                "band": [round(self.band[0], 4), round(self.band[1], 4)],
                "separation_by_axis": {k.upper(): round(v, 4)
                                       for k, v in self.separation_by_axis.items()}}


def central_crop(data: Any, size: int = CROP_SIZE) -> np.ndarray:
    """The central block of a (Z, Y, X) array-like, at most `size` voxels along each
    axis, as float32 (only that block is read from a memory map or Zarr array)."""
    sl = tuple(slice((int(n) - min(int(n), size)) // 2,
                     (int(n) - min(int(n), size)) // 2 + min(int(n), size))
               for n in data.shape)
    return np.array(data[sl], dtype=np.float32)  # a copy: never a view of the file


def tapered(crop: np.ndarray) -> torch.Tensor:
    """Mean-subtracted (Z, Y, X) crop times a Hann window along each axis (float64), so
    the box edges draw no streaks across the wedge."""
    a = torch.as_tensor(crop, dtype=torch.float64)
    a = a - a.mean()
    for ax, n in enumerate(a.shape):
        shape = [1, 1, 1]
        shape[ax] = n
        a = a * torch.hann_window(n, periodic=False, dtype=torch.float64).reshape(shape)
    return a


@dataclass(frozen=True)
class _Coefficients:
    """The rfft coefficients of `BAND`: frequencies (M, 3) in cycles per voxel,
    Hermitian weights, power, shell index; `signal` marks those of the signal band."""

    k: torch.Tensor
    w: torch.Tensor
    power: torch.Tensor
    shell: torch.Tensor
    n_shells: int
    signal: torch.Tensor
    band: tuple[float, float]

    def shell_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted mean of `x` over each coefficient's shell, per coefficient."""
        num = torch.bincount(self.shell, self.w * x, minlength=self.n_shells)
        return (num / torch.bincount(self.shell, self.w, minlength=self.n_shells)
                .clamp_min(1e-12))[self.shell]


def _coefficients(a: torch.Tensor) -> _Coefficients:
    """The coefficients of `BAND` of a tapered crop, with its signal band (step 1)."""
    shape = tuple(int(s) for s in a.shape)
    power = torch.fft.rfftn(a).abs() ** 2
    k = fourier_grid(shape, rfft=True, dtype=torch.float64)
    r = k.norm(dim=-1)
    shells, n_shells = shell_index(shape)
    w = hermitian_weights(shape[2], dtype=torch.float64).expand_as(power)
    per_shell = (torch.bincount(shells.flatten(), (w * power).flatten(), minlength=n_shells)
                 / torch.bincount(shells.flatten(), w.flatten(), minlength=n_shells)
                 .clamp_min(1e-12))
    k_shell = torch.arange(n_shells, dtype=torch.float64) / max(shape)
    in_band = (k_shell >= BAND[0]) & (k_shell <= BAND[1])
    top = (k_shell >= FLOOR_BAND[0]) & (k_shell <= FLOOR_BAND[1])
    floor = float(per_shell[top].median()) if top.any() else 0.0
    signal = in_band & (per_shell >= SIGNAL_FACTOR * floor)
    if int(signal.sum()) < MIN_SIGNAL_SHELLS:
        signal = in_band
    sel = (r >= BAND[0]) & (r <= BAND[1])
    ks = k_shell[signal]
    band = (float(ks.min()), float(ks.max())) if ks.numel() else BAND
    return _Coefficients(k[sel], w[sel], power[sel], shells[sel], n_shells,
                         signal[shells[sel]], band)


def _elevation(k: torch.Tensor, axis: str) -> torch.Tensor:
    """Elevation (degrees, [-90, 90]) of frequencies (..., 3) for a candidate axis."""
    if axis == "z":
        return _elevation_deg(k[..., [1, 0, 2]], "y")[0].double()
    return _elevation_deg(k, axis)[0].double()


def _bins(elev: torch.Tensor) -> torch.Tensor:
    """Elevation bin (0..N_BINS-1 over [-90, 90) degrees)."""
    return torch.clamp(((elev + 90.0) / 180.0 * N_BINS).long(), 0, N_BINS - 1)


def _best_split(bins: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """The contiguous bin range [lo, hi) whose values `x` (weights `w`) have the larger
    mean and the largest between-class variance."""
    wb = torch.bincount(bins, w, minlength=N_BINS)
    sb = torch.bincount(bins, w * x, minlength=N_BINS)
    zero = torch.zeros(1, dtype=torch.float64)
    cw, cs = torch.cat([zero, wb.cumsum(0)]), torch.cat([zero, sb.cumsum(0)])
    i = torch.arange(N_BINS + 1)
    lo, hi = torch.meshgrid(i, i, indexing="ij")
    w_in, s_in = cw[hi] - cw[lo], cs[hi] - cs[lo]
    w_out, s_out = cw[-1] - w_in, cs[-1] - s_in
    m_in, m_out = s_in / w_in.clamp_min(1e-12), s_out / w_out.clamp_min(1e-12)
    ok = (hi > lo) & (w_in > 0) & (w_out > 0) & (m_in > m_out)
    between = torch.where(ok, w_in * w_out / cw[-1] * (m_in - m_out) ** 2, 0.0)
    j = int(between.argmax())
    return j // (N_BINS + 1), j % (N_BINS + 1)


def _profile(bins: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    """Weighted mean of `q` per elevation bin (empty bins: 0)."""
    wb = torch.bincount(bins, w, minlength=N_BINS)
    return (torch.bincount(bins, w * q, minlength=N_BINS) / wb.clamp_min(1e-12)).numpy()


def _smooth(profile: np.ndarray) -> np.ndarray:
    """`PROFILE_BINS`-bin running mean, circular (-90 meets +90)."""
    h = PROFILE_BINS // 2
    return sum(np.roll(profile, i) for i in range(-h, h + 1)) / PROFILE_BINS


def _edges(profile: np.ndarray, lo: int, hi: int) -> tuple[float, float]:
    """Edges (degrees) of the measured range of a linear power profile per bin, from
    the log-domain split [lo, hi) (module docstring, step 3)."""
    width = 180.0 / N_BINS
    centres = (np.arange(N_BINS) + 0.5) * width - 90.0
    inside = np.zeros(N_BINS, dtype=bool)
    inside[lo:hi] = True
    floor = float(np.median(profile[~inside])) if (~inside).any() else 0.0
    e0 = (lo * width - 90.0, hi * width - 90.0)
    half = (e0[1] - e0[0]) / 2
    out = []
    for sgn, edge in ((-1, e0[0]), (1, e0[1])):
        inner = edge - sgn * min(19.0, half)
        band = (sgn * centres > sgn * edge - min(26.0, 2 * half)) & \
               (sgn * centres < sgn * edge - min(12.0, half / 2))
        plateau = float(np.median(profile[band] if band.any() else profile[inside]))
        capped = _smooth(np.minimum(profile, max(plateau, floor)))
        start = int(np.argmin(np.abs(centres - inner)))
        idx = np.arange(start, N_BINS) if sgn > 0 else np.arange(start, -1, -1)
        frac = np.clip((capped[idx] - floor) / max(plateau - floor, 1e-300), 0.0, 1.0)
        out.append(centres[start] - sgn * width / 2 + sgn * float(frac.sum()) * width)
    lo_deg = float(np.clip(out[0], -MAX_ANGLE, MAX_ANGLE - 1))
    return lo_deg, float(np.clip(out[1], lo_deg + 1, MAX_ANGLE))


def _edge_contrast(elev: torch.Tensor, w: torch.Tensor, x: torch.Tensor,
                   edges: tuple[float, float]) -> tuple[float, float]:
    """Separation and decades of the log power `x` of the coefficients `EDGE_WINDOW`
    degrees from either edge, inside against outside (module docstring, step 4)."""
    def dist(e: float) -> torch.Tensor:  # angular distance mod 180 (+-90: one direction)
        return torch.remainder(elev - e + 90.0, 180.0).sub(90.0).abs()

    near = torch.minimum(dist(edges[0]), dist(edges[1]))
    keep = (near >= EDGE_WINDOW[0]) & (near <= EDGE_WINDOW[1])
    inside = (elev >= edges[0]) & (elev <= edges[1])
    wi, wo = float((w * (keep & inside)).sum()), float((w * (keep & ~inside)).sum())
    if wi <= 0 or wo <= 0:
        return 0.0, 0.0
    xk, wk, ik = x[keep], w[keep], inside[keep]
    m_in = float((wk * xk)[ik].sum()) / wi
    m_out = float((wk * xk)[~ik].sum()) / wo
    mean = (wi * m_in + wo * m_out) / (wi + wo)
    total = float((wk * (xk - mean) ** 2).sum())
    between = wi * wo / (wi + wo) * (m_in - m_out) ** 2
    share = between / total if total > 0 else 0.0
    return (share if m_in > m_out else 0.0), (m_in - m_out) / math.log(10)


def estimate_wedge(data: Any, crop: int = CROP_SIZE) -> WedgeEstimate:
    """Estimate the tilt axis and measured range of a (Z, Y, X) tomogram (array-like,
    memory-mapped or in memory) from the power of its central crop (module docstring).
    A volume without structure (constant) gives separation 0 (not reliable)."""
    c = _coefficients(tapered(central_crop(data, crop)))
    scale = float(c.power.mean()) if c.power.numel() else 0.0
    if scale <= 0 or not math.isfinite(scale):
        return WedgeEstimate("y", -60.0, 60.0, 0.0, 0.0, dict.fromkeys(CANDIDATE_AXES, 0.0),
                             c.band)
    sig = c.signal
    logp = torch.log(c.power + 1e-12 * scale)
    resid = logp - c.shell_mean(logp)  # a shell lies wholly in or out of the signal band
    q = c.power / c.shell_mean(c.power).clamp_min(1e-300)
    found = {}
    for axis in CANDIDATE_AXES:
        elev = _elevation(c.k, axis)
        bins = _bins(elev)
        lo, hi = _best_split(bins[sig], c.w[sig], resid[sig])
        edges = _edges(_profile(bins, c.w, q), lo, hi)
        found[axis] = edges, _edge_contrast(elev[sig], c.w[sig], resid[sig], edges)
    axis = max(CANDIDATE_AXES, key=lambda ax: found[ax][1][0])
    (tilt_min, tilt_max), (share, decades) = found[axis]
    return WedgeEstimate(axis, tilt_min, tilt_max, share, decades,
                         {ax: found[ax][1][0] for ax in CANDIDATE_AXES}, c.band)


def estimate_wedge_file(path: str | os.PathLike, crop: int = CROP_SIZE) -> WedgeEstimate:
    """`estimate_wedge` of a tomogram file (MRC, TIFF) or OME-Zarr store, read
    memory-mapped where the format allows."""
    from cryowae.io import read_volume

    with read_volume(path) as vol:
        return estimate_wedge(vol.data, crop)


def spectrum_warning(data: Any, geometry: TiltGeometry, name: str = "") -> str | None:
    """One warning line when `geometry` (the one a command uses for the (Z, Y, X)
    tomogram `data`) disagrees with the tomogram's own spectrum, naming the likely
    cause (`cryowae.physics.geometry.estimate_mismatch`); None when they agree or the
    spectrum shows no clear wedge."""
    from cryowae.physics.geometry import estimate_mismatch

    return estimate_mismatch(geometry, estimate_wedge(data), name)


__all__ = ["BAND", "CANDIDATE_AXES", "CROP_SIZE", "WedgeEstimate", "central_crop",
           "estimate_wedge", "estimate_wedge_file", "spectrum_warning", "tapered"]
