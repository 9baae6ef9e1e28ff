"""The central crop of a (Z, Y, X) volume: the one implementation used wherever a
tomogram is too large to read whole (the wedge estimate, the noise spectrum of the
training targets, the spread calibration, the checks of a family).

`central_box` gives the slices, `crop_of` / `family_crop_of` / `central_crop` read them.
Only the box is read from a memory map or a Zarr array, and the result is a float32
copy, never a view of the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

Box = tuple[slice, slice, slice]


def central_box(shape: Sequence[int], edge: int, even: bool = False) -> Box:
    """Slices of the central box of at most `edge` voxels per axis of a volume of
    `shape` (the whole axis when shorter). With `even`, an odd box edge above 1 is
    lowered by one (even sizes keep the Fourier grid's Nyquist plane)."""
    out = []
    for n in (int(s) for s in shape):
        e = min(n, int(edge))
        if even and e > 1 and e % 2:
            e -= 1
        start = (n - e) // 2
        out.append(slice(start, start + e))
    return tuple(out)  # type: ignore[return-value]


def crop_of(volume: Any, box: tuple[Any, ...]) -> torch.Tensor:
    """float32 tensor of ``volume[box]`` (numpy, memmap, zarr, tensor): only the box is
    read, into a copy."""
    return torch.from_numpy(np.array(volume[box], dtype=np.float32))


def family_crop_of(samples: Any, box: tuple[Any, ...]) -> torch.Tensor:
    """(S, ...) float32 tensor of the same box of each sample of an (S, Z, Y, X) family,
    read one sample at a time."""
    return torch.stack([crop_of(samples, (i, *box)) for i in range(int(np.shape(samples)[0]))])


def central_crop(volume: Any, edge: int, even: bool = False) -> np.ndarray:
    """The central box (`central_box`) of a (Z, Y, X) array-like as a float32 array."""
    return np.array(volume[central_box(np.shape(volume), edge, even)], dtype=np.float32)


__all__ = ["Box", "central_box", "central_crop", "crop_of", "family_crop_of"]
