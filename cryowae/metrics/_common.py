"""Helpers shared by the metric modules: array conversion, input checks, moments."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io.volume import Volume
from cryowae.physics.geometry import TiltGeometry


def as_tensor(x: Any, name: str = "volume") -> torch.Tensor:
    """A float32 CPU-or-device tensor from a torch tensor, numpy array or `Volume`.

    A `cryowae.io.Volume` is loaded whole (``Volume.numpy()``); memory maps and zarr
    arrays are read into memory.
    """
    if isinstance(x, Volume):
        x = x.numpy()
    if isinstance(x, torch.Tensor):
        t = x.detach()
        return t if t.dtype == torch.float32 else t.to(torch.float32)
    try:
        arr = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise CryowaeInputError(f"{name}: not a numeric array ({exc})") from None
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # read-only memory map: torch wants its own copy
        arr = arr.copy()
    return torch.from_numpy(arr)


def check_pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("restored", "gt"),
               ndim: int = 3) -> None:
    """Raise `CryowaeInputError` unless `a` and `b` are `ndim`-D volumes of one shape."""
    for t, n in zip((a, b), names, strict=True):
        if t.ndim != ndim:
            raise CryowaeInputError(f"{n}: expected a {ndim}D (Z, Y, X) volume, got shape "
                                    f"{tuple(t.shape)}")
    if tuple(a.shape) != tuple(b.shape):
        raise CryowaeInputError(
            f"{names[0]} and {names[1]} differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} "
            "(Z, Y, X); crop or resample one of them first"
        )


def check_finite_tensor(t: torch.Tensor, name: str) -> None:
    """Raise `CryowaeInputError` if `t` holds NaN or infinite values."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CryowaeInputError(f"{name}: contains {bad} NaN or infinite voxels")


def as_geometry(geometry: TiltGeometry | None) -> TiltGeometry:
    """`geometry`, or the default -60..60 degrees about Y for None. Raises `TypeError`
    for anything else (e.g. a bare tilt angle passed where the geometry goes)."""
    if geometry is None:
        return TiltGeometry()
    if not isinstance(geometry, TiltGeometry):
        raise TypeError(f"expected a TiltGeometry, got {type(geometry).__name__}; build one "
                        "with TiltGeometry.from_range(tilt_min, tilt_max, axis)")
    return geometry


def volume_moments(v: torch.Tensor) -> tuple[float, float]:
    """Mean and population std of a (Z, Y, X) tensor, summed in float64 a slab of 16
    Z slices at a time (no float64 copy of the whole volume)."""
    n = v.numel()
    mean = sum(float(v[z:z + 16].sum(dtype=torch.float64))
               for z in range(0, v.shape[0], 16)) / n
    var = sum(float((v[z:z + 16].double() - mean).square().sum())
              for z in range(0, v.shape[0], 16)) / n
    return mean, math.sqrt(var)
