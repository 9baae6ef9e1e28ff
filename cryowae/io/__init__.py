"""Reading and writing tomograms: MRC (memory-mapped) and OME-Zarr, atomic writes.

`read_volume` and `write_volume` choose the format from the path: a directory or a
``.zarr`` suffix is OME-Zarr, anything else MRC.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path, check_output_path
from cryowae.io.mrc import (
    MRC_SUFFIXES,
    check_finite,
    open_mrc_writer,
    read_mrc,
    read_mrc_header,
    write_mrc,
    write_volume_mrc,
)
from cryowae.io.omezarr import create_ome_zarr, read_ome_zarr, write_ome_zarr
from cryowae.io.tilts import read_tilt_angles, write_tilt_angles
from cryowae.io.volume import Volume

__all__ = [
    "MRC_SUFFIXES", "Volume", "atomic_path", "check_finite", "check_output_path",
    "create_ome_zarr", "is_zarr_path", "open_mrc_writer", "read_mrc", "read_mrc_header",
    "read_ome_zarr", "read_tilt_angles", "read_volume", "write_mrc", "write_ome_zarr",
    "write_tilt_angles", "write_volume", "write_volume_mrc",
]


def is_zarr_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".zarr" or (p.is_dir() and (
        (p / ".zgroup").exists() or (p / "zarr.json").exists() or (p / ".zarray").exists()))


def read_volume(path: str | os.PathLike, check_nan: bool = False) -> Volume:
    """Read an MRC file or OME-Zarr store lazily; optionally check for NaN/Inf voxels."""
    vol = read_ome_zarr(path) if is_zarr_path(path) else read_mrc(path)
    if vol.data.ndim != 3:
        raise CryowaeInputError(f"{path}: expected a 3D (Z, Y, X) volume, got shape "
                                f"{tuple(vol.data.shape)}")
    if check_nan:
        check_finite(vol.data, name=str(path))
    return vol


def write_volume(path: str | os.PathLike, volume: Volume, overwrite: bool = True) -> Path:
    """Write a `Volume` as float32 MRC or OME-Zarr (3 levels), chosen by the suffix."""
    if Path(path).suffix.lower() == ".zarr":
        return write_ome_zarr(path, volume.data, volume.voxel_size, origin=volume.origin,
                              overwrite=overwrite)
    return write_volume_mrc(path, volume, overwrite=overwrite)
