"""OME-Zarr (NGFF) reading and chunked writing.

Writes NGFF 0.4 multiscales (zarr format 2, what napari and most viewers read today)
with axes z, y, x in angstrom, optionally preceded by non-spatial axes such as a
sample axis ``s`` for posterior families. Reads NGFF 0.4 and 0.5 (zarr v3) stores, as
published by the CryoET Data Portal. The metadata is written by `ome-zarr`; the pixel
data is written chunk by chunk with `zarr` so memory stays bounded for any size.

The multiscale's ``name`` is the store's final name without ``.zarr``/``.ome.zarr``
(``r`` for ``r.zarr``), never the temporary name it is written under. A store without a
scale in its metadata, inside a CryoET Data Portal ``VoxelSpacing<A>`` folder, takes its
voxel size from that folder (`cryowae.io.portal`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from ome_zarr.format import FormatV04
from ome_zarr.writer import write_multiscales_metadata

from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.io.portal import folder_voxel_spacing
from cryowae.io.volume import Volume

DEFAULT_CHUNK = 64


def store_name(path: str | os.PathLike) -> str:
    """The NGFF multiscale name of a store at `path`: its file name without ``.ome.zarr``
    or ``.zarr`` (``r.zarr`` -> ``r``)."""
    name = Path(path).name
    for suffix in (".ome.zarr", ".zarr"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _axes(extra_axes: Sequence[str]) -> list[dict[str, str]]:
    lead = [{"name": a, "type": "channel" if a == "c" else "other"} for a in extra_axes]
    return lead + [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]


def _datasets(levels: int, voxel_size: float, n_extra: int,
              origin: tuple[float, float, float]) -> list[dict[str, Any]]:
    out = []
    for lev in range(levels):
        f = 2**lev
        scale = [1.0] * n_extra + [voxel_size * f] * 3
        # a 2x2x2 mean-pooled voxel is centred half an original voxel further on
        shift = [0.0] * n_extra + [o + (f - 1) * voxel_size / 2 for o in origin]
        out.append({"path": str(lev), "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": shift}]})
    return out


def _level_shape(shape: Sequence[int], lev: int) -> tuple[int, ...]:
    n_extra = len(shape) - 3
    return tuple(shape[:n_extra]) + tuple(max(1, s // 2**lev) for s in shape[n_extra:])


def _downsample_level(src: zarr.Array, dst: zarr.Array, slab: int) -> None:
    """2x2x2 mean pooling from `src` into `dst`, `slab` output z-slices at a time."""
    n_extra = src.ndim - 3
    zd, yd, xd = dst.shape[n_extra:]
    for z0 in range(0, zd, slab):
        z1 = min(zd, z0 + slab)
        block = np.asarray(src[(Ellipsis, slice(2 * z0, 2 * z1), slice(0, 2 * yd),
                                slice(0, 2 * xd))], dtype=np.float32)
        lead = block.shape[:n_extra]
        block = block.reshape(*lead, z1 - z0, 2, yd, 2, xd, 2).mean(axis=(-5, -3, -1))
        dst[(Ellipsis, slice(z0, z1), slice(None), slice(None))] = block


class OmeZarrWriter:
    """An open OME-Zarr store being written: fill `level0`, then `finish()`.

    `name` is the multiscale's name in the NGFF metadata (default: `store_name(path)`);
    a store written under a temporary or ``.partial`` path is given its final name.
    `dtype` is every level's dtype; `compressor` a numcodecs codec, None for raw chunks,
    or ``"default"`` (zarr's default, Blosc lz4).
    """

    def __init__(self, path: Path, shape: Sequence[int], voxel_size: float, levels: int,
                 chunks: Sequence[int], extra_axes: Sequence[str],
                 origin: tuple[float, float, float], attrs: dict[str, Any] | None,
                 name: str | None = None, dtype: str = "float32",
                 compressor: Any = "default") -> None:
        if len(shape) != 3 + len(extra_axes):
            raise ValueError(f"shape {tuple(shape)} does not fit axes {list(extra_axes)} + zyx")
        self.path, self.voxel_size, self.origin = path, float(voxel_size), origin
        self.name = name if name is not None else store_name(path)
        self.extra_axes = list(extra_axes)
        self.levels = max(1, int(levels))
        self.group = zarr.open_group(str(path), mode="a", zarr_format=2)
        self.arrays: list[zarr.Array] = []
        for lev in range(self.levels):
            lshape = _level_shape(shape, lev)
            lchunks = tuple(min(c, s) for c, s in zip(chunks, lshape, strict=True))
            codec = {} if isinstance(compressor, str) else {"compressors": compressor}
            arr = self.group.require_array(str(lev), shape=lshape, chunks=lchunks,
                                           dtype=dtype, fill_value=0.0, **codec)
            self.arrays.append(arr)
        if attrs:
            self.group.attrs.update(attrs)

    @property
    def level0(self) -> zarr.Array:
        return self.arrays[0]

    def finish(self, slab: int = 32) -> None:
        """Compute the pyramid levels from level 0 and write the NGFF metadata."""
        for lev in range(1, self.levels):
            _downsample_level(self.arrays[lev - 1], self.arrays[lev], slab)
        write_multiscales_metadata(
            self.group,
            _datasets(self.levels, self.voxel_size, len(self.extra_axes), self.origin),
            fmt=FormatV04(), axes=_axes(self.extra_axes), name=self.name)


def default_chunks(ndim_extra: int, chunk: int = DEFAULT_CHUNK) -> tuple[int, ...]:
    return (1,) * ndim_extra + (chunk,) * 3


@contextlib.contextmanager
def create_ome_zarr(path: str | os.PathLike, shape: Sequence[int], voxel_size: float,
                    levels: int = 3, chunks: Sequence[int] | None = None,
                    extra_axes: Sequence[str] = (),
                    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                    attrs: dict[str, Any] | None = None,
                    overwrite: bool = True) -> Iterator[OmeZarrWriter]:
    """Create an OME-Zarr store atomically and yield its writer.

    Fill ``writer.level0`` (shape `shape`, axes `extra_axes` + z, y, x) chunk by chunk;
    when the block ends, the pyramid and metadata are written and the store is renamed
    to `path`. Non-spatial leading axes get chunk 1 (one sample per chunk).
    """
    chunks = tuple(chunks) if chunks else default_chunks(len(extra_axes))
    with atomic_path(path, overwrite=overwrite) as tmp:
        writer = OmeZarrWriter(tmp, shape, voxel_size, levels, chunks, extra_axes, origin,
                               attrs, name=store_name(path))
        yield writer
        writer.finish()


def write_ome_zarr(path: str | os.PathLike, data: Any, voxel_size: float, levels: int = 3,
                   chunks: Sequence[int] | None = None, extra_axes: Sequence[str] = (),
                   origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
                   attrs: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write an array (numpy, memmap, zarr, dask) to OME-Zarr, chunk-row by chunk-row."""
    shape = tuple(int(s) for s in data.shape)
    with create_ome_zarr(path, shape, voxel_size, levels, chunks, extra_axes, origin, attrs,
                         overwrite) as w:
        zc = w.level0.chunks[len(extra_axes)]
        for z0 in range(0, shape[len(extra_axes)], zc):
            sl = (Ellipsis, slice(z0, z0 + zc), slice(None), slice(None))
            w.level0[sl] = np.asarray(data[sl], dtype=np.float32)
    return Path(path)


def _multiscales(group: zarr.Group) -> list[dict[str, Any]] | None:
    attrs = dict(group.attrs)
    if "multiscales" in attrs:  # NGFF 0.4
        return attrs["multiscales"]
    if "ome" in attrs and "multiscales" in attrs["ome"]:  # NGFF 0.5 (zarr v3)
        return attrs["ome"]["multiscales"]
    return None


def read_ome_zarr(path: str | os.PathLike, level: int = 0) -> Volume:
    """Open an OME-Zarr store (or a plain zarr array) lazily as a `Volume`.

    ``Volume.data`` is the zarr array of pyramid `level`; its leading non-spatial axes
    (e.g. ``s`` of a posterior family) are kept. ``meta["levels"]`` lists all levels
    and ``meta["axes"]`` their names. ``meta["voxel_source"]`` says where the voxel size
    came from: ``"ngff"`` (the level's scale), ``"folder"`` (no scale in the metadata; a
    CryoET Data Portal ``VoxelSpacing<A>`` folder name) or ``"default"`` (1 A).
    """
    p = Path(path)
    if not p.exists():
        raise CryowaeInputError(f"{p}: no such file or directory")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several types for a non-store
        raise CryowaeInputError(f"{p}: not a readable Zarr store ({type(exc).__name__})") from None
    folder = folder_voxel_spacing(p)
    if isinstance(node, zarr.Array):
        return Volume(data=node, voxel_size=folder or 1.0,
                      meta={"source": str(p), "levels": [node], "axes": ["z", "y", "x"],
                            "voxel_source": "default" if folder is None else "folder"})
    ms = _multiscales(node)
    if not ms:
        raise CryowaeInputError(f"{p}: Zarr group without OME-NGFF multiscales metadata")
    m = ms[0]
    axes = [a["name"] if isinstance(a, dict) else a for a in m.get("axes", ["z", "y", "x"])]
    datasets = m["datasets"]
    if not 0 <= level < len(datasets):
        raise CryowaeInputError(f"{p}: pyramid level {level} absent ({len(datasets)} levels)")
    arrays = [node[d["path"]] for d in datasets]
    scale, origin = None, [0.0] * len(axes)
    for t in datasets[level].get("coordinateTransformations", []):
        if t["type"] == "scale":
            scale = t["scale"]
        elif t["type"] == "translation":
            origin = t["translation"]
    units = [a.get("unit") if isinstance(a, dict) else None for a in m.get("axes", [])]
    factor = 10.0 if units[-1:] == ["nanometer"] else 1e4 if units[-1:] == ["micrometer"] else 1.0
    if scale is not None:
        voxel, source = float(scale[-1]) * factor, "ngff"
    elif folder is not None:  # the folder names the level-0 spacing
        voxel, source = folder * 2**level, "folder"
    else:
        voxel, source = 1.0, "default"
    if voxel <= 0:
        raise CryowaeInputError(f"{p}: voxel size {voxel} in the NGFF metadata is invalid")
    o = tuple(float(v) * factor for v in origin[-3:])
    return Volume(data=arrays[level], voxel_size=voxel, origin=o,  # type: ignore[arg-type]
                  meta={"source": str(p), "levels": arrays, "axes": axes,
                        "attrs": dict(node.attrs), "voxel_source": source})
