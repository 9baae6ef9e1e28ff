"""Streaks along the missing wedge's edges, measured in empty regions of a tomogram.

A back-projected tilt series leaves rays along the beam direction of each tilt; those
of the extreme tilts are not cancelled by a neighbour beyond them and show as streaks
at the edge angles in XZ sections (tilt axis Y), and a restorer can keep or strengthen
them. A line along the beam of tilt theta has its Fourier power in the central plane
sampled at tilt theta, so streaks from the edges put power at Fourier elevations
(``atan(kz / k_in)``, `cryowae.physics.wedge`; k_in = kx for tilt axis Y) near
tilt_min and tilt_max.

Empty regions (`find_empty_blocks`): blocks of `block`^3 voxels on a grid with a
stride of half a block; the tomogram the blocks are chosen on (the raw one) is low-passed
by a Gaussian of `lowpass_sigma` voxels (``exp(-2 pi^2 sigma^2 |k|^2)`` in Fourier space)
and each block scored by its variance; blocks within `annotation_margin` voxels of an
annotated point are left out, and the quietest `empty_fraction` of the rest (at least
one) are kept.

Streak power (`streak_power`): each kept block of the volume scored, mean-subtracted and
tapered by a separable Hann window, gives a power spectrum |F(k)|^2 (averaged over the
blocks, Welch). Over the coefficients with ``band[0] <= |k| <= band[1]`` cycles per voxel
whose in-plane part ``sqrt(kz^2 + k_in^2)`` is at least half of |k| (the elevation of a
coefficient near the tilt axis is not defined), with d(k) the angular distance (degrees,
modulo 180) of the elevation to the nearer edge:

    edge   = { d <= edge_halfwidth_deg },  flanks = { flank_deg[0] < d <= flank_deg[1] }
    streak ratio = mean_{edge} h |F|^2 / mean_{flanks} h |F|^2      (per coefficient)

(h the rfft multiplicity). The flanks lie on both sides of each edge, the measured
and the wedge side, so noise that fills the measured region only (a raw tomogram) and
noise that fills all of Fourier space (an isotropic restoration) both give about 1;
power concentrated at the edge angles gives more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_geometry, as_tensor, volume_moments
from cryowae.physics.fourier import fourier_grid, hermitian_weights
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import _elevation_deg


@dataclass(frozen=True)
class StreakSettings:
    """Empty-region search and edge/flank definitions (lengths in voxels, angles in
    degrees, frequencies in cycles per voxel)."""

    block: int = 32
    empty_fraction: float = 0.25
    lowpass_sigma: float = 2.0
    annotation_margin: float = 8.0
    edge_halfwidth_deg: float = 5.0
    flank_deg: tuple[float, float] = (10.0, 20.0)
    band: tuple[float, float] = (0.1, 0.45)

    def __post_init__(self) -> None:
        if not (isinstance(self.block, int) and self.block >= 8):
            raise CryowaeInputError(f"streak block must be an integer >= 8 voxels, got "
                                    f"{self.block!r}")
        if not 0.0 < self.empty_fraction <= 1.0:
            raise CryowaeInputError(f"empty_fraction must lie in (0, 1], got "
                                    f"{self.empty_fraction:g}")
        lo, hi = (float(x) for x in self.flank_deg)
        if not 0.0 < self.edge_halfwidth_deg < lo < hi <= 90.0:
            raise CryowaeInputError(f"need 0 < edge_halfwidth_deg < flank_deg[0] < "
                                    f"flank_deg[1] <= 90, got {self.edge_halfwidth_deg:g}, "
                                    f"({lo:g}, {hi:g})")
        b0, b1 = (float(x) for x in self.band)
        if not 0.0 < b0 < b1 <= 0.5:
            raise CryowaeInputError(f"streak band must satisfy 0 < low < high <= 0.5 cycles "
                                    f"per voxel, got ({b0:g}, {b1:g})")
        object.__setattr__(self, "flank_deg", (lo, hi))
        object.__setattr__(self, "band", (b0, b1))

    def block_for(self, shape: tuple[int, ...]) -> int:
        """The block side used on a volume of `shape`: `block`, at most its shortest
        axis (at least 8 voxels needed)."""
        b = min(self.block, *(int(s) for s in shape))
        if b < 8:
            raise CryowaeInputError(f"volume {tuple(shape)} too small for the streak "
                                    "figure (every axis needs 8 voxels)")
        return b


def _starts(size: int, block: int) -> list[int]:
    """Block starts along one axis: stride block // 2, the last block flush with the end."""
    s = list(range(0, size - block + 1, max(1, block // 2)))
    if s[-1] != size - block:
        s.append(size - block)
    return s


def gaussian_lowpass(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Real-space Gaussian blur of `sigma` voxels, applied in Fourier space (periodic),
    in the volume's precision."""
    shape = tuple(int(s) for s in volume.shape)
    k2 = fourier_grid(shape, rfft=True).square().sum(-1)
    g = torch.exp(-2.0 * math.pi ** 2 * sigma ** 2 * k2)
    spec = torch.fft.rfftn(volume) * g
    return torch.fft.irfftn(spec, s=shape)


def find_empty_blocks(raw: Any, settings: StreakSettings | None = None,
                      avoid_points: np.ndarray | None = None) -> np.ndarray:
    """Starts (M, 3) (z, y, x) of the quietest blocks of `raw` (module docstring),
    quietest first; (0, 3) when every block lies near an annotated point.
    `avoid_points`: (N, 3) voxel coordinates to keep away from."""
    s = settings or StreakSettings()
    v = as_tensor(raw, "raw")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    b = s.block_for(tuple(v.shape))
    with torch.no_grad():
        low = gaussian_lowpass(v, s.lowpass_sigma)
    starts = np.array([(z, y, x) for z in _starts(v.shape[0], b)
                       for y in _starts(v.shape[1], b) for x in _starts(v.shape[2], b)])
    if avoid_points is not None and len(avoid_points):
        p = np.asarray(avoid_points, dtype=np.float64)
        lo = starts[:, None, :] - s.annotation_margin
        hi = starts[:, None, :] + (b - 1) + s.annotation_margin
        near = ((p[None] >= lo) & (p[None] <= hi)).all(axis=2).any(axis=1)
        starts = starts[~near]
        if len(starts) == 0:
            return starts.reshape(0, 3)
    var = np.array([float(low[z:z + b, y:y + b, x:x + b].double().var())
                    for z, y, x in starts])
    keep = max(1, int(math.ceil(s.empty_fraction * len(starts))))
    return starts[np.argsort(var, kind="stable")[:keep]]


def _taper(b: int) -> torch.Tensor:
    h = torch.hann_window(b, periodic=False, dtype=torch.float64)
    return h[:, None, None] * h[None, :, None] * h[None, None, :]


def streak_power(volume: Any, starts: np.ndarray, geometry: TiltGeometry | None = None,
                 settings: StreakSettings | None = None) -> dict[str, float]:
    """Power at the wedge-edge elevations over that of the flanking elevations, in the
    blocks at `starts` (module docstring).

    Returns
    -------
    dict
        ``streak_ratio``, ``edge_power`` and ``flank_power`` (mean power per
        coefficient, ortho FFT of the volume normalised to unit std, so volumes on
        different intensity scales compare; nan without blocks) and ``n_blocks``.
    """
    s = settings or StreakSettings()
    geo = as_geometry(geometry)
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    b = s.block_for(tuple(v.shape))
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    if len(starts) == 0:
        return {"streak_ratio": math.nan, "edge_power": math.nan, "flank_power": math.nan,
                "n_blocks": 0}
    sd = volume_moments(v)[1]
    scale = 1.0 / (sd if sd > 0 else 1.0)
    win = _taper(b)
    power = torch.zeros((b, b, b // 2 + 1), dtype=torch.float64)
    with torch.no_grad():
        for z, y, x in starts:
            blk = v[z:z + b, y:y + b, x:x + b].double() * scale
            power += torch.fft.rfftn((blk - blk.mean()) * win, norm="ortho").abs().square()
    power /= len(starts)
    k = fourier_grid((b, b, b), rfft=True, dtype=torch.float64)
    r = k.norm(dim=-1)
    k_in = k[..., 2] if geo.axis == "y" else k[..., 1]
    in_plane = torch.sqrt(k[..., 0] ** 2 + k_in ** 2)
    elev, _ = _elevation_deg(k, geo.axis)
    dist = torch.full_like(elev, 180.0)
    for edge in (geo.tilt_min, geo.tilt_max):
        d = (elev - edge).abs() % 180.0
        dist = torch.minimum(dist, torch.minimum(d, 180.0 - d))
    use = (r >= s.band[0]) & (r <= s.band[1]) & (in_plane >= 0.5 * r)
    edge_sel = use & (dist <= s.edge_halfwidth_deg)
    flank_sel = use & (dist > s.flank_deg[0]) & (dist <= s.flank_deg[1])
    h = hermitian_weights(b, torch.float64).expand(power.shape)

    def mean(sel: torch.Tensor) -> float:
        return float((power * h)[sel].sum() / h[sel].sum()) if bool(sel.any()) else math.nan

    e, f = mean(edge_sel), mean(flank_sel)
    ratio = e / f if math.isfinite(f) and f > 0 else math.nan
    return {"streak_ratio": ratio, "edge_power": e, "flank_power": f,
            "n_blocks": int(len(starts))}


__all__ = ["StreakSettings", "find_empty_blocks", "gaussian_lowpass", "streak_power"]
