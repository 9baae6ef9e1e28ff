"""Global intensity statistics of a volume, read slab by slab (bounded memory)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError


def volume_stats(data: Any, max_slabs: int = 64, slab: int = 4) -> tuple[float, float]:
    """Mean and standard deviation of a (Z, Y, X) volume, read slab by slab.

    Up to `max_slabs` evenly spaced slabs are read, so a huge memory-mapped tomogram is
    never loaded whole.
    """
    nz = data.shape[0]
    starts = np.unique(np.linspace(0, max(nz - slab, 0), num=min(max_slabs, nz)).astype(int))
    s = s2 = 0.0
    n = 0
    for z in starts:
        block = np.asarray(data[z:z + slab], dtype=np.float64)
        s += block.sum()
        s2 += (block**2).sum()
        n += block.size
    mean = s / n
    std = math.sqrt(max(s2 / n - mean**2, 0.0))
    if not np.isfinite(std) or std <= 0:
        raise CryowaeInputError("volume has zero variance (constant); nothing to restore")
    return float(mean), float(std)
