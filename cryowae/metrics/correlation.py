"""Real-space agreement between a restored volume and its ground truth.

Both metrics take (Z, Y, X) arrays (torch tensors, numpy arrays or `Volume`s) of one
shape and return Python floats. Sums run over Z slabs in float64, so memory stays near
the size of the inputs whatever their dtype.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor, check_pair

#: Z slices per slab in the float64 passes
_SLAB = 16


def normalise(volume: Any) -> torch.Tensor:
    """A float32 copy with zero mean and unit (population) standard deviation.

    Statistics are accumulated in float64. A constant volume becomes all zeros.
    """
    v = as_tensor(volume)
    m = _moments(v, v)
    sd = math.sqrt(m["saa"] / m["n"])
    out = v - m["mean_a"]
    return out * 0.0 if sd == 0.0 else out / sd


def _slabs(a: torch.Tensor, b: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for z in range(0, a.shape[0], _SLAB):
        yield a[z:z + _SLAB].to(torch.float64), b[z:z + _SLAB].to(torch.float64)


def _moments(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Means, centred second moments (sums) and the range of `b`, in two passes."""
    n = a.numel()
    sa = sb = 0.0
    bmin, bmax = math.inf, -math.inf
    for x, y in _slabs(a, b):
        sa += float(x.sum())
        sb += float(y.sum())
        bmin, bmax = min(bmin, float(y.min())), max(bmax, float(y.max()))
    ma, mb = sa / n, sb / n
    saa = sbb = sab = 0.0
    for x, y in _slabs(a, b):
        x, y = x - ma, y - mb
        saa += float((x * x).sum())
        sbb += float((y * y).sum())
        sab += float((x * y).sum())
    return {"n": float(n), "mean_a": ma, "mean_b": mb, "saa": saa, "sbb": sbb, "sab": sab,
            "min_b": bmin, "max_b": bmax}


def pearson(restored: Any, gt: Any) -> float:
    """Pearson correlation coefficient over all voxels, in [-1, 1].

    ``r = sum((a - mean a)(b - mean b)) / sqrt(sum((a - mean a)^2) sum((b - mean b)^2))``.
    Invariant to the intensity offset and positive scale of either volume. A constant
    volume has no defined correlation: 0.0 is returned.
    """
    a, b = as_tensor(restored, "restored"), as_tensor(gt, "gt")
    check_pair(a, b)
    m = _moments(a, b)
    den = math.sqrt(m["saa"] * m["sbb"])
    return 0.0 if den == 0.0 else max(-1.0, min(1.0, m["sab"] / den))


def psnr_db(restored: Any, gt: Any) -> float:
    """Peak signal-to-noise ratio in decibels, computed on normalised volumes.

    Both volumes are first normalised to zero mean and unit (population) standard
    deviation, so the intensity scale and offset that different reconstruction programs
    write do not matter. With ``g`` the normalised ground truth and ``r`` the normalised
    restoration,

        PSNR = 10 log10( (max g - min g)^2 / mean((r - g)^2) )

    i.e. the peak is the dynamic range of the normalised ground truth. A constant
    restoration normalises to zeros. Returns ``inf`` for identical volumes; raises
    `CryowaeInputError` for a constant ground truth (no range to use as the peak).
    """
    a, b = as_tensor(restored, "restored"), as_tensor(gt, "gt")
    check_pair(a, b)
    m = _moments(a, b)
    n = m["n"]
    sd_a, sd_b = math.sqrt(m["saa"] / n), math.sqrt(m["sbb"] / n)
    if sd_b == 0.0:
        raise CryowaeInputError("gt: the ground-truth volume is constant; PSNR is undefined")
    peak = (m["max_b"] - m["min_b"]) / sd_b
    sq = 0.0
    for x, y in _slabs(a, b):
        xa = (x - m["mean_a"]) / sd_a if sd_a > 0.0 else x * 0.0
        d = xa - (y - m["mean_b"]) / sd_b
        sq += float((d * d).sum())
    mse = sq / n
    if mse <= 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)
