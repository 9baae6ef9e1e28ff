"""napari reader: MRC-family files, TIFF stacks, OME-Zarr stores and posterior-family
directories.

Everything opens lazily: MRC data stay the memory map `cryowae.io.read_mrc` returns,
uncompressed TIFF stacks the memory map of `cryowae.io.read_tiff` (a compressed one is
read into memory),
Zarr data the zarr arrays of `cryowae.io.read_ome_zarr` (all pyramid levels, shown as
multiscale), and a family's mean and std, when only ``samples.zarr`` is at hand, dask
reductions over the sample axis. Contrast limits are computed from a small subsample.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._layers import LayerData, family_layers, volume_layer

#: file suffixes read as MRC
MRC_SUFFIXES = (".mrc", ".rec", ".map", ".st", ".mrcs", ".ali")
#: file suffixes read as TIFF stacks (when the file is a grey stack of several slices)
TIFF_SUFFIXES = (".tif", ".tiff")
FAMILY_FILES = ("samples.zarr", "mean.mrc", "std.mrc")

PathLike = str | os.PathLike


def is_family_dir(path: PathLike) -> bool:
    """A directory written by `cryowae sample`: samples.zarr, or mean.mrc and std.mrc."""
    p = Path(path)
    return p.is_dir() and ((p / "samples.zarr").is_dir() or
                           ((p / "mean.mrc").is_file() and (p / "std.mrc").is_file()))


def path_kind(path: PathLike) -> str | None:
    """'family', 'zarr', 'mrc', 'tiff' or None (not for this reader)."""
    from cryowae.io import is_zarr_path
    from cryowae.io.tiff import is_tiff_stack

    p = Path(path)
    if is_family_dir(p):
        return "family"
    if p.exists() and is_zarr_path(p):
        return "zarr"
    if p.is_file() and p.suffix.lower() in MRC_SUFFIXES:
        return "mrc"
    if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES and is_tiff_stack(p):
        return "tiff"
    return None


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> Callable | None:
    """npe2 reader entry: a reader function if every path is ours, else None."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not paths or not all(path_kind(p) for p in paths):
        return None
    return read_paths


def read_paths(path: PathLike | Sequence[PathLike]) -> list[LayerData]:
    """Layer data of each path, in order."""
    paths = [path] if isinstance(path, str | os.PathLike) else list(path)
    out: list[LayerData] = []
    for p in paths:
        out.extend(read_path(p))
    return out


def read_path(path: PathLike) -> list[LayerData]:
    kind = path_kind(path)
    if kind == "family":
        return read_family_dir(path)
    if kind == "zarr":
        return read_zarr(path)
    if kind == "mrc":
        return [read_mrc_layer(path)]
    if kind == "tiff":
        return [read_tiff_layer(path)]
    from cryowae.errors import CryowaeInputError

    raise CryowaeInputError(f"{path}: not an MRC file, TIFF stack, OME-Zarr store or "
                            "family directory")


def read_mrc_layer(path: PathLike, name: str | None = None, kind: str = "tomogram") -> LayerData:
    """One memory-mapped MRC volume; scale = voxel size, translate = header origin."""
    from cryowae.io import read_mrc

    p = Path(path)
    vol = read_mrc(p)
    # the numpy memmap holds its own reference to the file's map: no handle to keep
    return volume_layer(vol.data, name or p.stem, vol.voxel_size, vol.origin, kind=kind,
                        extra={"source": str(p)})


def read_tiff_layer(path: PathLike) -> LayerData:
    """One TIFF stack; scale = its stored voxel size (1 A when it stores none, the
    layer's ``voxel_size_note`` saying so)."""
    from cryowae.io import read_volume

    p = Path(path)
    vol = read_volume(p)
    note = {"voxel_size_note": vol.meta["voxel_note"]} if "voxel_note" in vol.meta else {}
    return volume_layer(vol.data, p.stem, vol.voxel_size, vol.origin,
                        extra={"source": str(p)} | note)


def _family_info(directory: Path) -> dict[str, Any]:
    f = directory / "family.json"
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return {}
    return {}


def _lazy_moments(levels: list[Any]) -> tuple[list[Any], list[Any]]:
    """Per-level mean and std over the sample axis, as dask arrays (computed per view)."""
    import dask.array as da

    stacks = [da.from_zarr(a) if not isinstance(a, da.Array) else a for a in levels]
    return [s.mean(axis=0) for s in stacks], [s.std(axis=0) for s in stacks]


def read_samples_store(store: PathLike, name: str | None = None,
                       mean_path: Path | None = None, std_path: Path | None = None,
                       info: dict[str, Any] | None = None) -> list[LayerData]:
    """A samples.zarr store (axes s, z, y, x) as samples, mean and std layers.

    Mean and std come from `mean_path` / `std_path` when given (memory-mapped), else
    from lazy dask reductions over the samples."""
    from cryowae.errors import CryowaeInputError
    from cryowae.io import read_mrc, read_ome_zarr

    vol = read_ome_zarr(store)
    levels = vol.meta["levels"]
    axes = vol.meta.get("axes", [])
    if levels[0].ndim != 4 or (axes and axes[0] != "s"):
        raise CryowaeInputError(f"{store}: expected a posterior family store with axes "
                                f"(s, z, y, x), found axes {axes}")
    lazy_mean, lazy_std = (None, None)
    if mean_path is None or std_path is None:
        lazy_mean, lazy_std = _lazy_moments(levels)
    mean = read_mrc(mean_path).data if mean_path else lazy_mean
    std = read_mrc(std_path).data if std_path else lazy_std
    name = name or Path(store).stem
    return family_layers(levels if len(levels) > 1 else levels[0], mean, std, name,
                         vol.voxel_size, vol.origin, info)


def read_family_dir(directory: PathLike) -> list[LayerData]:
    """A family directory: samples.zarr + mean.mrc + std.mrc (+ family.json)."""
    from cryowae.io import read_mrc

    d = Path(directory)
    info = _family_info(d)
    mean_path = d / "mean.mrc" if (d / "mean.mrc").is_file() else None
    std_path = d / "std.mrc" if (d / "std.mrc").is_file() else None
    if (d / "samples.zarr").is_dir():
        return read_samples_store(d / "samples.zarr", d.name, mean_path, std_path, info)
    mean, std = read_mrc(mean_path), read_mrc(std_path)  # type: ignore[arg-type]
    return family_layers(None, mean.data, std.data, d.name, mean.voxel_size, mean.origin,
                         info)


def read_zarr(path: PathLike) -> list[LayerData]:
    """An OME-Zarr store: a tomogram (all pyramid levels), or a family's samples."""
    from cryowae.io import read_ome_zarr

    p = Path(path)
    vol = read_ome_zarr(p)
    axes = vol.meta.get("axes", [])
    levels = vol.meta["levels"]
    if levels[0].ndim == 4 and axes and axes[0] == "s":
        parent = p.parent
        mean = parent / "mean.mrc" if (parent / "mean.mrc").is_file() else None
        std = parent / "std.mrc" if (parent / "std.mrc").is_file() else None
        name = parent.name if p.name == "samples.zarr" else p.stem
        return read_samples_store(p, name, mean, std, _family_info(parent))
    data = levels if len(levels) > 1 else levels[0]
    return [volume_layer(data, p.stem, vol.voxel_size, vol.origin,
                         extra={"source": str(p)})]
