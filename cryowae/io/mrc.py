"""MRC/.rec/.map/.st reading (memory-mapped) and float32 writing, with validation.

Uses `mrcfile`. Headers are read through a memory map, so a 10 GB tomogram is never
loaded to learn its shape or voxel size.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.io.volume import Volume

#: MRC modes cryowae reads: int8, int16, float32, uint16, float16 (MRC2014). Every one
#: is converted to float32 (statistics: float64) before any arithmetic, so no integer
#: wraps and no float16 sum overflows.
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
#: Modes cryowae refuses, named in the error.
UNSUPPORTED_MODES = {3: "complex int16", 4: "complex float32", 16: "RGB bytes",
                     101: "4-bit integers"}
#: IMOD's stamp at header byte 152 (the bit flags at byte 156 are then meaningful);
#: flag 1 means mode-0 bytes are signed. The stamp lies in mrcfile's ``extra2``
#: (header bytes 112-195).
IMOD_STAMP = 1146047817
_IMOD_STAMP_AT = 152 - 112
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".mrcs", ".ali")


def _mode_error(path: Path, mode: int) -> CryowaeInputError:
    what = f" ({UNSUPPORTED_MODES[mode]})" if mode in UNSUPPORTED_MODES else ""
    return CryowaeInputError(
        f"{path}: MRC mode {mode}{what} is not supported "
        f"(supported: {', '.join(f'{k} ({v})' for k, v in SUPPORTED_MODES.items())})")


def _header_mode(path: Path) -> int | None:
    """The mode of a file mrcfile refuses to open, read from its header alone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, header_only=True, permissive=True) as mrc:
                return int(mrc.header.mode)
    except Exception:  # not even a header: the caller reports the first error
        return None


def _open_mmap(path: Path):
    if not path.exists():
        raise CryowaeInputError(f"{path}: no such file")
    if path.is_dir():
        raise CryowaeInputError(f"{path}: is a directory, not an MRC file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # mrcfile warns on some corrupt headers
            return mrcfile.mmap(path, mode="r", permissive=False)
    except (ValueError, OSError, RuntimeWarning, UserWarning, EOFError) as exc:
        mode = _header_mode(path)
        if mode is not None and mode not in SUPPORTED_MODES:
            raise _mode_error(path, mode) from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CryowaeInputError(f"{path}: not a readable MRC file ({msg})") from None


def mode0_unsigned(header: Any) -> bool:
    """Whether the bytes of a mode-0 file are unsigned (uint8) rather than MRC2014's int8.

    IMOD before 4.2.23 wrote unsigned bytes; later IMOD writes a stamp and a flag saying
    which. Unsigned when the IMOD stamp is present without the signed flag, or, without
    the stamp, when the header's minimum is >= 0 and its maximum > 127 (impossible for
    int8). Otherwise signed (the standard).
    """
    extra = bytes(header.extra2)
    int32 = header.dtype.fields["nx"][0]  # int32 in the file's byte order
    stamp, flags = np.frombuffer(extra[_IMOD_STAMP_AT:_IMOD_STAMP_AT + 8], dtype=int32)
    if int(stamp) == IMOD_STAMP:
        return not int(flags) & 1
    return float(header.dmin) >= 0 and float(header.dmax) > 127


def _header_meta(mrc: Any) -> dict[str, Any]:
    h = mrc.header
    labels = [
        bytes(lbl).decode("ascii", "replace").rstrip("\x00 ").strip()
        for lbl in h.label[: int(h.nlabl)]
    ]
    return {
        "mrc_labels": [lbl for lbl in labels if lbl],
        "mrc_nstart": (int(h.nzstart), int(h.nystart), int(h.nxstart)),
        "mrc_mode": int(h.mode),
    }


def read_mrc(path: str | os.PathLike, mmap: bool = True,
             voxel_size: float | None = None) -> Volume:
    """Read an MRC file as a `Volume` (Z, Y, X), memory-mapped by default.

    ``data`` keeps the file's dtype (int8, int16, float32, uint16, float16; uint8 for
    mode-0 files of unsigned bytes, see `mode0_unsigned`): readers convert blocks to
    float32 as they read them. ``meta["voxel_stored"]`` is the header's voxel size;
    `voxel_size` (Angstrom), when given, replaces it. Raises `CryowaeInputError` for a
    missing, non-MRC, truncated or unsupported-mode file and for a zero voxel size when
    none is given. The data is not checked for NaNs here (that would read the whole
    file): call `check_finite`.
    """
    path = Path(path)
    mrc = _open_mmap(path)
    mode = int(mrc.header.mode)
    if mode not in SUPPORTED_MODES:
        mrc.close()
        raise _mode_error(path, mode)
    data = mrc.data
    unsigned = mode == 0 and data is not None and mode0_unsigned(mrc.header)
    if unsigned:
        data = data.view(np.uint8)  # same bytes, still memory-mapped
    if data is None or data.ndim not in (2, 3):
        mrc.close()
        raise CryowaeInputError(f"{path}: expected a 3D volume, found no 3D data block")
    if data.ndim == 2:
        data = data[None]
    vs = mrc.voxel_size
    voxel = (float(vs.z), float(vs.y), float(vs.x))
    if voxel_size is None and (min(voxel) <= 0 or not np.all(np.isfinite(voxel))):
        mrc.close()
        raise CryowaeInputError(
            f"{path}: the header gives voxel size {voxel[2]:g} A (zero or invalid); "
            "pass --voxel-size, or fix the header (e.g. with `alterheader` or mrcfile)"
        )
    if voxel_size is None and max(voxel) - min(voxel) > 1e-3 * max(voxel):
        warnings.warn(
            f"{path}: anisotropic voxel size {voxel} (z, y, x); cryowae uses x = {voxel[2]:g} A",
            stacklevel=2,
        )
    o = mrc.header.origin
    meta = _header_meta(mrc) | {"source": str(path), "voxel_stored": voxel[2],
                                "voxel_source": "header"}
    if unsigned:
        meta["mrc_mode0_unsigned"] = True
    if not mmap:
        data = np.array(data)
        mrc.close()
    else:
        meta["_mrc_handle"] = mrc  # keeps the memory map alive as long as the Volume
    return Volume(data=data, voxel_size=voxel[2] if voxel_size is None else float(voxel_size),
                  origin=(float(o.z), float(o.y), float(o.x)), meta=meta)


def read_mrc_header(path: str | os.PathLike) -> dict[str, Any]:
    """Shape (Z, Y, X), voxel size (A), origin (A) and mode, without reading the data."""
    vol = read_mrc(path, mmap=True)
    out = {"shape": vol.shape, "voxel_size": vol.voxel_size, "origin": vol.origin,
           "mode": vol.meta["mrc_mode"]}
    vol.meta["_mrc_handle"].close()
    return out


def _apply_header(mrc: Any, voxel_size: float, origin: tuple[float, float, float],
                  meta: dict[str, Any] | None) -> None:
    mrc.voxel_size = float(voxel_size)
    mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = origin
    meta = meta or {}
    if "mrc_nstart" in meta:
        z, y, x = meta["mrc_nstart"]
        mrc.header.nzstart, mrc.header.nystart, mrc.header.nxstart = z, y, x
    for label in list(meta.get("mrc_labels", []))[:8]:
        mrc.add_label(label[:80])
    mrc.add_label(f"cryowae {__version__}"[:80])


def write_mrc(path: str | os.PathLike, data: Any, voxel_size: float,
              origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
              meta: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write a float32 (mode 2) MRC file atomically.

    Parameters
    ----------
    data
        (Z, Y, X) array-like (numpy, torch on CPU, ...).
    voxel_size
        Angstrom per voxel.
    origin
        (z, y, x) origin in Angstrom.
    meta
        `Volume.meta` of the input, to carry its header labels and start indices over.
    """
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim != 3:
        raise CryowaeInputError(f"write_mrc needs a 3D (Z, Y, X) array, got shape {arr.shape}")
    with atomic_path(path, overwrite=overwrite) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            _apply_header(mrc, voxel_size, origin, meta)
            mrc.update_header_stats()
    return Path(path)


def write_volume_mrc(path: str | os.PathLike, volume: Volume, overwrite: bool = True) -> Path:
    """Write a `Volume` to MRC, keeping its voxel size, origin and header labels."""
    return write_mrc(path, volume.numpy(), volume.voxel_size, volume.origin, volume.meta,
                     overwrite=overwrite)


@contextlib.contextmanager
def open_mrc_writer(path: str | os.PathLike, shape: tuple[int, int, int], voxel_size: float,
                    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                    meta: dict[str, Any] | None = None,
                    overwrite: bool = True, mode: int = 2) -> Iterator[np.memmap]:
    """A memory-mapped (Z, Y, X) output to fill block by block: float32 (`mode` 2) or
    float16 (`mode` 12).

    The file lives under a temporary name until the `with` block ends without error;
    header statistics are then computed slab by slab (bounded memory) and the file is
    renamed into place.
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        if mode not in (2, 12):
            raise ValueError(f"open_mrc_writer writes MRC modes 2 and 12, not {mode}")
        with mrcfile.new_mmap(tmp, shape=tuple(int(s) for s in shape), mrc_mode=mode,
                              overwrite=True) as mrc:
            yield mrc.data
            _apply_header(mrc, voxel_size, origin, meta)
            _update_stats_slabwise(mrc)


def release_pages(data: Any) -> bool:
    """Write a memory-mapped array's dirty pages to its file and drop its pages from this
    process's resident memory (they are read back from the file when touched again).

    A pass over a memory-mapped output (header statistics, a finite check) otherwise
    leaves the whole file resident in the process. Returns False for arrays that are not
    memory-mapped or on platforms without ``madvise``.
    """
    base = data
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    mm = base._mmap
    mm.flush()
    mm.madvise(mmap.MADV_DONTNEED)
    return True


def _update_stats_slabwise(mrc: Any, slab: int = 16) -> None:
    data = mrc.data
    lo, hi, total, total2, n = np.inf, -np.inf, 0.0, 0.0, 0
    for z in range(0, data.shape[0], slab):
        if z and z % (8 * slab) == 0:
            release_pages(data)  # keep the resident part of the output bounded
        block = np.asarray(data[z:z + slab], dtype=np.float64)
        lo, hi = min(lo, block.min()), max(hi, block.max())
        total += block.sum()
        total2 += (block**2).sum()
        n += block.size
    release_pages(data)
    mean = total / n
    mrc.header.dmin, mrc.header.dmax, mrc.header.dmean = lo, hi, mean
    mrc.header.rms = float(np.sqrt(max(total2 / n - mean**2, 0.0)))


def check_finite(data: Any, name: str = "volume", slab: int = 16) -> None:
    """Raise `CryowaeInputError` if any voxel is NaN or infinite (reads slab by slab)."""
    for z in range(0, data.shape[0], slab):
        block = np.asarray(data[z:z + slab])
        if not np.all(np.isfinite(block)):
            bad = int(np.size(block) - np.count_nonzero(np.isfinite(block)))
            raise CryowaeInputError(
                f"{name}: contains NaN or infinite voxels (at least {bad} in slices "
                f"{z}-{min(z + slab, data.shape[0]) - 1})"
            )
