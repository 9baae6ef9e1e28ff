"""The one small type that carries a tomogram through cryowae."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A 3D map with its physical metadata.

    Attributes
    ----------
    data
        Array of shape (Z, Y, X). May be a numpy memmap, a zarr array or a dask array:
        nothing here forces it into memory.
    voxel_size
        Isotropic voxel size in Angstrom.
    origin
        Origin of the map in Angstrom, ordered (z, y, x).
    meta
        Free-form metadata (MRC header fields kept for round trips, source path...).
    """

    data: Any
    voxel_size: float = 1.0
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]

    def close(self) -> None:
        """Release the file behind `data` (an open MRC memory map); `data` must not be
        used afterwards. Safe to call twice; does nothing for in-memory arrays."""
        handle = self.meta.pop("_mrc_handle", None)
        if handle is not None:
            handle.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def numpy(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Load the whole volume as a numpy array (Z, Y, X) of `dtype`."""
        return np.asarray(self.data, dtype=dtype)
