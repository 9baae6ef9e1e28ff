"""Tiling geometry for seam-free inference: tile positions, blending windows, reflect padding.

Pure functions, no torch. A tomogram is restored in overlapping tiles; each tile's output
is weighted by a separable window that is largest in the tile's centre and small (never
zero) at its edges, and the weighted sum is divided by the sum of the weights. Because
the tiles form a full grid, that sum is separable too: the product of the per-axis sums
(`weight_sum_1d`), so no weight volume has to be stored.

Coordinates: each axis of the volume is extended by reflection (``pad_before`` voxels in
front, ``pad_after`` behind) so that voxels at the volume's border sit inside a tile, away
from the zero padding of the network's convolutions. Tile starts are given in these
padded ("virtual") coordinates; real index = virtual index - pad_before. The padded
grid of a plan has the shape `TilePlan.padded_shape`; a field defined on that grid (a
sampler's latent field, say) is cropped for a tile at its padded start.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: blending windows `window_1d` knows; "flat" (plain averaging) is for comparisons only
WINDOWS = ("cosine", "gaussian", "flat")


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `n`."""
    multiple = max(1, int(multiple))
    return int(math.ceil(n / multiple) * multiple)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start positions of tiles of length `tile` covering ``[0, size)``.

    Neighbouring tiles overlap by at least `overlap` voxels: the fewest tiles that allow
    it are spread evenly, the first starting at 0 and the last flush with the end (so
    the overlaps differ by at most one voxel). A `size` smaller than or equal to `tile`
    gives one tile at 0 (the caller pads the volume to `tile`).
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if size <= tile:
        return [0]
    n = int(math.ceil((size - overlap) / (tile - overlap)))
    n = max(n, 2)
    starts = np.round(np.linspace(0, size - tile, n)).astype(int)
    return [int(s) for s in starts]


def window_1d(length: int, kind: str = "cosine") -> np.ndarray:
    """A blending window of `length` samples (float64), 1 at most, > 0 everywhere.

    ``cosine``: ``sin^2(pi (k + 1/2) / length)``, a Hann window shifted by half a voxel so
    that its end samples are small but not zero. ``gaussian``: sigma = length / 8 (as
    nnU-Net), floored at 1e-3. ``flat``: all ones (plain averaging of overlapping tiles;
    shows seams).
    """
    if length <= 0:
        raise ValueError(f"window length must be positive, got {length}")
    k = np.arange(length, dtype=np.float64)
    if kind == "cosine":
        w = np.sin(np.pi * (k + 0.5) / length) ** 2
    elif kind == "gaussian":
        c, sigma = (length - 1) / 2.0, length / 8.0
        w = np.maximum(np.exp(-0.5 * ((k - c) / sigma) ** 2), 1e-3)
    elif kind == "flat":
        w = np.ones(length)
    else:
        raise ValueError(f"unknown window {kind!r}; choose one of {', '.join(WINDOWS)}")
    return w / w.max()


def window_3d(tile: Sequence[int], kind: str = "cosine") -> np.ndarray:
    """The separable (Z, Y, X) window for a tile of shape `tile` (float32)."""
    wz, wy, wx = (window_1d(int(t), kind) for t in tile)
    return (wz[:, None, None] * wy[None, :, None] * wx[None, None, :]).astype(np.float32)


def weight_sum_1d(extent: int, tile: int, starts: Sequence[int],
                  kind: str = "cosine") -> np.ndarray:
    """Sum over tiles of their 1D windows along one axis of length `extent` (float64)."""
    w = window_1d(tile, kind)
    total = np.zeros(extent, dtype=np.float64)
    for s in starts:
        total[s:s + tile] += w
    return total


def reflect_index(index: np.ndarray | Sequence[int], size: int) -> np.ndarray:
    """Map indices (possibly outside ``[0, size)``) into it by mirror reflection.

    Same convention as ``numpy.pad(mode="reflect")`` (the edge voxel is not repeated),
    applied as often as needed for indices far outside; a size of 1 maps everything to 0.
    """
    idx = np.asarray(index, dtype=np.int64)
    if size <= 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m < size, m, period - m)


def reflect_pad(block: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pad a 3D array by reflection, `pads` = ((before, after),) * 3; any widths."""
    idx = [reflect_index(np.arange(-b, n + a), n)
           for (b, a), n in zip(pads, block.shape, strict=True)]
    return block[np.ix_(*idx)]


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one axis: real `size`, tile length, reflect padding and tile starts."""

    size: int
    tile: int
    pad_before: int
    pad_after: int
    starts: tuple[int, ...]  # in padded coordinates

    @property
    def extent(self) -> int:
        """Length of the padded axis."""
        return self.pad_before + self.size + self.pad_after

    def real_range(self, start: int) -> tuple[int, int]:
        """The part ``[lo, hi)`` of the real axis that the tile starting at `start` covers."""
        lo = start - self.pad_before
        return max(lo, 0), min(lo + self.tile, self.size)

    def real_indices(self, start: int) -> np.ndarray:
        """Real (reflected) indices of the voxels of the tile starting at `start`."""
        return reflect_index(np.arange(start, start + self.tile) - self.pad_before, self.size)

    def overlapping(self, lo: int, hi: int) -> list[int]:
        """Indices (into `starts`) of the tiles whose real range overlaps ``[lo, hi)``."""
        return [i for i, s in enumerate(self.starts)
                if self.real_range(s)[0] < hi and self.real_range(s)[1] > lo]

    def weight_sum(self, kind: str = "cosine") -> np.ndarray:
        """Sum of the tiles' windows at each real voxel of the axis (float64, > 0)."""
        total = weight_sum_1d(self.extent, self.tile, self.starts, kind)
        return total[self.pad_before:self.pad_before + self.size]


def plan_axis(size: int, tile: int, overlap: int, multiple: int = 1) -> AxisPlan:
    """Tile one axis of length `size` with tiles of `tile` (a multiple of `multiple`).

    The axis is padded by reflection with ``overlap // 2`` voxels at each end so that the
    border voxels are not at a tile edge. When the padded axis fits in one tile, that
    tile shrinks to the smallest multiple of `multiple` that holds it, and the volume is
    padded (by reflection, centred) to that length.
    """
    if size <= 0:
        raise ValueError(f"axis size must be positive, got {size}")
    if tile % multiple:
        raise ValueError(f"tile {tile} is not a multiple of {multiple}")
    margin = overlap // 2
    need = size + 2 * margin
    if need <= tile:
        t = round_up(need, multiple)
        before = (t - size) // 2
        return AxisPlan(size, t, before, t - size - before, (0,))
    starts = tile_starts(need, tile, overlap)
    return AxisPlan(size, tile, margin, margin, tuple(starts))


@dataclass(frozen=True)
class TilePlan:
    """Tiling of a (Z, Y, X) volume: one `AxisPlan` per axis and the blending window."""

    axes: tuple[AxisPlan, AxisPlan, AxisPlan]
    window: str = "cosine"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size for a in self.axes)  # type: ignore[return-value]

    @property
    def tile(self) -> tuple[int, int, int]:
        return tuple(a.tile for a in self.axes)  # type: ignore[return-value]

    @property
    def padded_shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) extent of the padded grid the tile starts refer to."""
        return tuple(a.extent for a in self.axes)  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        return math.prod(len(a.starts) for a in self.axes)

    def tile_window(self) -> np.ndarray:
        return window_3d(self.tile, self.window)

    def edges(self, axis: int) -> list[int]:
        """Real positions where a tile begins or ends along `axis` (inside the volume):
        a tile covers voxels up to index e-1 and another starts at e. For seam checks."""
        a = self.axes[axis]
        out = set()
        for s in a.starts:
            for e in (s - a.pad_before, s - a.pad_before + a.tile):
                if 0 < e < a.size:
                    out.add(int(e))
        return sorted(out)


def core_tiles(plan: TilePlan, core: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per axis, the indices (into ``axis.starts``) of the tiles whose real range overlaps
    ``core = ((z0, z1), (y0, y1), (x0, x1))`` (real voxel ranges, end exclusive).

    Raises `ValueError` for a core that is empty or leaves the volume.
    """
    if len(core) != 3:
        raise ValueError(f"expected a (Z, Y, X) core, got {tuple(core)}")
    out = []
    for ax, (c0, c1) in zip(plan.axes, core, strict=True):
        if not 0 <= c0 < c1 <= ax.size:
            raise ValueError(f"core range {c0}-{c1} is empty or outside [0, {ax.size})")
        out.append(ax.overlapping(c0, c1))
    return out


def plan_tiles(shape: Sequence[int], tile: int, overlap: int, multiple: int = 1,
               window: str = "cosine") -> TilePlan:
    """Plan the tiles of a (Z, Y, X) volume; see `plan_axis` (`tile` must already be a
    multiple of `multiple`)."""
    if window not in WINDOWS:
        raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
    if len(shape) != 3:
        raise ValueError(f"expected a (Z, Y, X) shape, got {tuple(shape)}")
    axes = tuple(plan_axis(int(s), tile, overlap, multiple) for s in shape)
    return TilePlan(axes, window)  # type: ignore[arg-type]


__all__ = [
    "WINDOWS", "AxisPlan", "TilePlan", "core_tiles", "plan_axis", "plan_tiles", "reflect_index",
    "reflect_pad", "round_up", "tile_starts", "weight_sum_1d", "window_1d", "window_3d",
]
