"""TIFF stacks (one page per Z slice, or an ImageJ/OME hyperstack) read with `tifffile`.

The first image series is the tomogram, its size-1 axes dropped: it must be (Z, Y, X)
or a single (Y, X) slice. An uncompressed, contiguous file is memory-mapped
(`tifffile.memmap`); any other (compressed, tiled in pieces) is read into memory.

The voxel size comes, in this order, from OME-XML (``PhysicalSizeX`` and its unit,
micrometres when none is given), from ImageJ metadata (the X resolution in pixels per
``unit``), or from the TIFF resolution tags (pixels per inch, centimetre, millimetre or
micrometre; a value outside `RESOLUTION_TAG_RANGE` is a writer's default such as 72 per
inch, not a voxel size); a file with none of these stores no voxel size
(`TiffVoxelSize.value` None).
"""

from __future__ import annotations

import contextlib
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError
from cryowae.io.volume import Volume

#: file suffixes of TIFF files
TIFF_SUFFIXES = (".tif", ".tiff")
#: the first four bytes of a TIFF (little and big endian) and of a BigTIFF
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Angstrom per length unit, by the names OME-XML, ImageJ and TIFF tags use
ANGSTROM_PER_UNIT = {
    "a": 1.0, "å": 1.0, "\u212b": 1.0, "angstrom": 1.0, "pm": 1e-2, "nm": 10.0,
    "nanometer": 10.0, "um": 1e4, "µm": 1e4, "\u03bcm": 1e4, "micron": 1e4,
    "micrometer": 1e4, "mm": 1e7, "millimeter": 1e7, "cm": 1e8, "centimeter": 1e8,
    "inch": 2.54e8,
}

#: voxel sizes (Angstrom) the TIFF resolution tags may give; outside: none stored
RESOLUTION_TAG_RANGE = (0.1, 1e4)


@dataclass(frozen=True)
class TiffVoxelSize:
    """A TIFF's voxel size in Angstrom (None when the file stores none) and where it
    came from: ``"ome"``, ``"imagej"``, ``"resolution"`` or ``"none"``."""

    value: float | None
    source: str


def _angstrom(size: float, unit: str | None) -> float | None:
    factor = ANGSTROM_PER_UNIT.get((unit or "").strip().lower())
    if factor is None or not np.isfinite(size) or size <= 0:
        return None
    return float(size) * factor


def _ome_voxel_size(xml: str) -> float | None:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "Pixels" and "PhysicalSizeX" in el.attrib:
            try:
                size = float(el.attrib["PhysicalSizeX"])
            except ValueError:
                return None
            return _angstrom(size, el.attrib.get("PhysicalSizeXUnit", "µm"))
    return None


def _x_pixels_per_unit(page: Any) -> float | None:
    """Pixels per unit along X from the XResolution tag, or None."""
    tag = page.tags.get("XResolution")
    if tag is None:
        return None
    num, den = tag.value
    return num / den if num > 0 and den > 0 else None


def tiff_voxel_size(tif: Any) -> TiffVoxelSize:
    """The voxel size (Angstrom) an open `tifffile.TiffFile` stores (module docstring)."""
    if tif.is_ome and tif.ome_metadata:
        value = _ome_voxel_size(tif.ome_metadata)
        if value is not None:
            return TiffVoxelSize(value, "ome")
    page = tif.pages.first
    per_unit = _x_pixels_per_unit(page)
    if tif.is_imagej and tif.imagej_metadata:
        unit = str(tif.imagej_metadata.get("unit", "")).replace("\\u00B5", "µ")
        if per_unit is not None and unit:
            value = _angstrom(1.0 / per_unit, unit)
            if value is not None:
                spacing = tif.imagej_metadata.get("spacing")
                z = _angstrom(float(spacing), unit) if spacing else None
                if z is not None and abs(z - value) > 1e-3 * value:
                    warnings.warn(f"{tif.filehandle.path}: anisotropic voxel size (z "
                                  f"{z:g} A, x {value:g} A); cryowae uses x", stacklevel=3)
                return TiffVoxelSize(value, "imagej")
    unit_tag = page.tags.get("ResolutionUnit")
    unit = getattr(unit_tag.value, "name", "") if unit_tag is not None else ""
    if per_unit is not None and unit and unit != "NONE":
        value = _angstrom(1.0 / per_unit, unit)
        if value is not None and RESOLUTION_TAG_RANGE[0] <= value <= RESOLUTION_TAG_RANGE[1]:
            return TiffVoxelSize(value, "resolution")
    return TiffVoxelSize(None, "none")


def is_tiff(path: str | os.PathLike) -> bool:
    """True when the file starts with a TIFF or BigTIFF signature."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def is_tiff_stack(path: str | os.PathLike) -> bool:
    """True for a readable TIFF whose first series is a grey (Z, Y, X) stack of more
    than one slice (what a tomogram looks like; a single image or a colour one is not)."""
    if not is_tiff(path):
        return False
    try:
        with _open(Path(path)) as tif:
            series = tif.series[0]
            return _zyx_shape(Path(path), tuple(series.shape), str(series.axes))[0] > 1
    except CryowaeInputError:
        return False


def _zyx_shape(path: Path, shape: tuple[int, ...], axes: str) -> tuple[int, int, int]:
    """The series' shape as (Z, Y, X) without its size-1 axes; refuses colour samples
    and more than three axes."""
    if axes.endswith("S") and shape[-1] > 1:
        raise CryowaeInputError(f"{path}: a colour TIFF ({shape[-1]} samples per pixel); "
                                "expected one grey value per voxel")
    dims = tuple(n for n in shape if n > 1)
    if len(dims) == 2:
        return (1, *dims)
    if len(dims) != 3:
        raise CryowaeInputError(f"{path}: expected a 3D (Z, Y, X) stack, found a TIFF "
                                f"series of shape {tuple(shape)} (axes {axes})")
    return dims  # type: ignore[return-value]


@contextlib.contextmanager
def _open(path: Path) -> Iterator[Any]:
    """An open `tifffile.TiffFile`; its errors become one `CryowaeInputError` line."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            yield tif
    except CryowaeInputError:  # a ValueError said in cryowae's words already
        raise
    except (tifffile.TiffFileError, ValueError, IndexError, OSError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CryowaeInputError(f"{path}: not a readable TIFF file ({msg})") from None


def read_tiff_voxel_size(path: str | os.PathLike) -> TiffVoxelSize:
    """The voxel size a TIFF file stores, from its metadata alone."""
    with _open(Path(path)) as tif:
        return tiff_voxel_size(tif)


def read_tiff(path: str | os.PathLike, mmap: bool = True) -> Volume:
    """Read a TIFF stack as a `Volume` (Z, Y, X), memory-mapped when the file allows it
    and `mmap` (module docstring).

    ``data`` keeps the file's dtype (readers convert blocks to float32 as they read
    them). ``voxel_size`` is the stored one, 1.0 when there is none;
    ``meta["voxel_stored"]`` is the stored value or None, ``meta["voxel_source"]`` where
    it came from (`TiffVoxelSize`). Raises `CryowaeInputError` for an unreadable file,
    complex voxels or a series that is not one 3D stack.
    """
    import tifffile

    path = Path(path)
    with _open(path) as tif:
        series = tif.series[0]
        shape, axes, dtype = tuple(series.shape), str(series.axes), np.dtype(series.dtype)
        voxel = tiff_voxel_size(tif)
        if dtype.kind not in "biuf":
            raise CryowaeInputError(f"{path}: TIFF voxels of type {dtype} are not "
                                    "supported (expected integers or floats)")
        zyx = _zyx_shape(path, shape, axes)
        contiguous = series.dataoffset is not None  # uncompressed, in one piece
        data = tifffile.memmap(path, mode="r", series=0) if mmap and contiguous \
            else series.asarray()
    meta = {"source": str(path), "tiff_axes": axes, "voxel_stored": voxel.value,
            "voxel_source": voxel.source}
    return Volume(data=data.reshape(zyx), voxel_size=voxel.value or 1.0, meta=meta)


__all__ = ["TIFF_MAGIC", "TIFF_SUFFIXES", "TiffVoxelSize", "is_tiff", "is_tiff_stack", "read_tiff",
           "read_tiff_voxel_size", "tiff_voxel_size"]
