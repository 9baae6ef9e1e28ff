"""Display helpers with no GUI dependency: robust contrast limits read from a small
subsample, and the Fourier amplitude of a central section.

Everything here reads array-likes (numpy memmaps, zarr and dask arrays) piece by piece;
nothing loads a whole large tomogram.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

#: voxels read to estimate contrast limits
SAMPLE_BUDGET = 1 << 18


def _read(data: Any, lead: tuple[int, ...], *spatial: Any) -> np.ndarray:
    return np.asarray(data[lead + tuple(spatial)], dtype=np.float32)


def _chunk_shape(data: Any) -> tuple[int, ...] | None:
    """Chunk shape of a zarr (``chunks`` of ints) or dask (``chunksize``) array, else None."""
    size = getattr(data, "chunksize", None)
    if size is None:
        size = getattr(data, "chunks", None)
    if size is None or not all(isinstance(c, int | np.integer) for c in size):
        return None
    return tuple(int(c) for c in size)


def _starts(n: int, block: int, count: int) -> list[int]:
    """Starts of up to `count` chunk-aligned blocks of size `block` in [0, n), central
    ones first choice (the borders of a tomogram are often empty or padded)."""
    nblocks = max(1, -(-n // block))
    if nblocks <= count:
        idx = np.arange(nblocks)
    else:
        idx = np.round(np.linspace(0, nblocks - 1, num=count + 2)[1:-1]).astype(int)
    return sorted({int(i) * block for i in idx})


def subsample(data: Any, budget: int = SAMPLE_BUDGET) -> np.ndarray:
    """A flat sample of about `budget` voxels of a (..., Z, Y, X) array-like.

    Leading axes (e.g. the samples axis of a posterior family) are fixed at index 0.
    Chunked arrays (zarr, dask) are read in a few whole chunks spread over the volume;
    others (memmaps) in up to 16 strided Z sections, so the read is a small part of the
    file either way.
    """
    shape = tuple(int(s) for s in data.shape)
    lead = (0,) * (len(shape) - 3)
    nz, ny, nx = shape[-3:]
    if nz * ny * nx <= budget:
        return _read(data, lead, slice(None), slice(None), slice(None)).ravel()
    chunks = _chunk_shape(data)
    parts = []
    if chunks is not None:
        bz, by, bx = (max(1, min(c, s, 64))
                      for c, s in zip(chunks[-3:], (nz, ny, nx), strict=True))
        blocks = list(itertools.product(_starts(nz, bz, 2), _starts(ny, by, 2),
                                        _starts(nx, bx, 2)))
        per = max(1, budget // len(blocks))
        step = max(1, int(np.ceil((bz * by * bx / per) ** (1 / 3))))
        for z0, y0, x0 in blocks:
            parts.append(_read(data, lead, slice(z0, z0 + bz, step), slice(y0, y0 + by, step),
                               slice(x0, x0 + bx, step)).ravel())
        return np.concatenate(parts)
    n_sec = min(16, nz)
    zs = np.unique(np.linspace(0.1 * (nz - 1), 0.9 * (nz - 1), num=n_sec).round().astype(int))
    per = max(1, budget // len(zs))
    step = max(1, int(np.ceil(np.sqrt(ny * nx / per))))
    for z in zs:
        parts.append(_read(data, lead, int(z), slice(None, None, step),
                           slice(None, None, step)).ravel())
    return np.concatenate(parts)


def robust_limits(data: Any, low: float = 0.5, high: float = 99.5,
                  budget: int = SAMPLE_BUDGET) -> tuple[float, float]:
    """Contrast limits: the `low` and `high` percentiles of a subsample of `data`."""
    values = subsample(data, budget)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if not hi > lo:
        span = max(abs(lo), 1.0) * 1e-3
        lo, hi = lo - span, hi + span
    return lo, hi


def coarsest(levels: list[Any], min_voxels: int = 32**3) -> Any:
    """The coarsest pyramid level that still holds `min_voxels` spatial voxels."""
    for arr in reversed(levels):
        if int(np.prod(arr.shape[-3:])) >= min_voxels:
            return arr
    return levels[0]


def _tukey(n: int, fraction: float) -> np.ndarray:
    """A cosine-tapered window of length `n`: flat in the middle, `fraction` tapered."""
    w = np.ones(n, dtype=np.float64)
    m = int(fraction * n / 2)
    if m > 0:
        ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(m) + 0.5) / m))
        w[:m], w[n - m:] = ramp, ramp[::-1]
    return w


def fourier_section(data: Any, tilt_axis: str = "y", taper: float = 0.2,
                    slab: int = 16) -> np.ndarray:
    """log |F| of the central Fourier section that holds the missing wedge, fftshifted.

    For tilt axis Y that is the XZ plane ky = 0, shape (Z, X); for tilt axis X the YZ
    plane kx = 0, shape (Z, Y). By the projection-slice theorem it is exactly the 2D
    Fourier transform of the projection of the volume along the tilt axis, which is
    computed slab by slab. The projection is mean-subtracted and tapered at its borders
    so the box edges do not draw streaks across the wedge.
    """
    if tilt_axis not in ("y", "x"):
        raise ValueError(f"tilt axis must be 'y' or 'x', got {tilt_axis!r}")
    axis = 1 if tilt_axis == "y" else 2
    nz = int(data.shape[0])
    proj = np.concatenate([np.asarray(data[z:z + slab], dtype=np.float64).sum(axis=axis)
                           for z in range(0, nz, slab)])
    proj -= proj.mean()
    proj *= np.outer(_tukey(proj.shape[0], taper), _tukey(proj.shape[1], taper))
    amp = np.abs(np.fft.fftshift(np.fft.fft2(proj)))
    floor = max(float(amp.max()) * 1e-6, np.finfo(np.float32).tiny)
    return np.log(amp + floor).astype(np.float32)
