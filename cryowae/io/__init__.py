"""Reading and writing tomograms: MRC (memory-mapped), TIFF stacks and OME-Zarr, atomic
writes.

`read_volume` chooses the reader from the path and the file's first bytes: a directory
or a ``.zarr`` suffix is OME-Zarr, a TIFF signature TIFF, an MRC header MRC; any other
file is refused in one line naming what it holds (`cryowae.io.formats`). Its voxel size
follows `cryowae.io.voxel` (stored, given, or an assumed 1 A). `write_volume` writes
MRC or OME-Zarr, chosen by the suffix.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path, check_output_path
from cryowae.io.formats import file_format
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
from cryowae.io.tiff import TIFF_SUFFIXES, read_tiff, read_tiff_voxel_size
from cryowae.io.tilts import read_tilt_angles, write_tilt_angles
from cryowae.io.volume import Volume
from cryowae.io.voxel import current_given_voxel_size, given_voxel_size, resolve_voxel_size

__all__ = [
    "MRC_SUFFIXES", "TIFF_SUFFIXES", "Volume", "atomic_path", "check_finite",
    "check_output_path", "create_ome_zarr", "given_voxel_size", "is_zarr_path",
    "open_mrc_writer", "read_mrc", "read_mrc_header", "read_ome_zarr", "read_tiff",
    "read_tilt_angles", "read_volume", "voxel_size_of", "write_mrc", "write_ome_zarr",
    "write_tilt_angles", "write_volume", "write_volume_mrc",
]


def is_zarr_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.suffix.lower() == ".zarr" or (p.is_dir() and (
        (p / ".zgroup").exists() or (p / "zarr.json").exists() or (p / ".zarray").exists()))


def _file_format(path: Path) -> str:
    """``"zarr"``, ``"tiff"`` or ``"mrc"`` (a missing path or a plain directory goes to
    the MRC reader, whose errors say so); `CryowaeInputError` naming what any other
    file holds."""
    if is_zarr_path(path):
        return "zarr"
    if not path.is_file():
        return "mrc"
    found = file_format(path)
    if found not in ("tiff", "mrc"):
        raise CryowaeInputError(f"{path}: not an MRC, TIFF or OME-Zarr tomogram (found "
                                f"{found})")
    return found


def _stored_voxel_size(vol: Volume) -> float | None:
    if vol.meta.get("voxel_source") == "default":  # OME-Zarr without a scale
        return None
    return vol.meta.get("voxel_stored", vol.voxel_size)


def read_volume(path: str | os.PathLike, check_nan: bool = False,
                voxel_size: float | None = None) -> Volume:
    """Read an MRC file, TIFF stack or OME-Zarr store lazily (memory-mapped where the
    format allows); optionally check for NaN/Inf voxels.

    The voxel size is `voxel_size` when given, else that of the enclosing
    `given_voxel_size` block, else the stored one, else 1 A (`resolve_voxel_size`);
    ``meta["voxel_note"]`` holds the line to say about it, if any.
    """
    p = Path(path)
    given = voxel_size if voxel_size is not None else current_given_voxel_size()
    kind = _file_format(p)
    vol = (read_ome_zarr(p) if kind == "zarr" else read_tiff(p) if kind == "tiff"
           else read_mrc(p, voxel_size=given))
    vol.voxel_size, note = resolve_voxel_size(_stored_voxel_size(vol), given, str(p))
    if note:
        vol.meta["voxel_note"] = note
    if vol.data.ndim != 3:
        raise CryowaeInputError(f"{path}: expected a 3D (Z, Y, X) volume, got shape "
                                f"{tuple(vol.data.shape)}")
    if check_nan:
        check_finite(vol.data, name=str(path))
    return vol


def voxel_size_of(path: str | os.PathLike,
                  voxel_size: float | None = None) -> tuple[float, str | None]:
    """The voxel size `read_volume` gives `path` (with `voxel_size` or the enclosing
    `given_voxel_size`) and its line (`resolve_voxel_size`), from the header alone."""
    p = Path(path)
    given = voxel_size if voxel_size is not None else current_given_voxel_size()
    if _file_format(p) == "tiff":  # a compressed TIFF is not read to learn its header
        return resolve_voxel_size(read_tiff_voxel_size(p).value, given, str(p))
    with read_volume(p, voxel_size=given) as vol:
        return vol.voxel_size, vol.meta.get("voxel_note")


def write_volume(path: str | os.PathLike, volume: Volume, overwrite: bool = True) -> Path:
    """Write a `Volume` as float32 MRC or OME-Zarr (3 levels), chosen by the suffix."""
    if Path(path).suffix.lower() == ".zarr":
        return write_ome_zarr(path, volume.data, volume.voxel_size, origin=volume.origin,
                              overwrite=overwrite)
    return write_volume_mrc(path, volume, overwrite=overwrite)
