"""Worker tasks of `restore-batch`: normalisation, one block, finishing a tomogram.

Tasks carry paths and numbers, never models: a worker loads the checkpoint once
(`cryowae.models.cache.cached_restorer`) on its device
(`cryowae.inference.cluster.worker_device`). Every task closes the files it opens.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError
from cryowae.inference.batch.settings import DONE_DIR, Core
from cryowae.tiling.settings import TileSettings


def open_level0(store: str | os.PathLike, mode: str = "r+") -> Any:
    """Level 0 (full resolution) of an output store, as a zarr array."""
    import zarr

    return zarr.open_array(str(Path(store) / "0"), mode=mode, zarr_format=2)


def tomogram_norm(path: str) -> tuple[float, float]:
    """Worker task: the global (mean, std) `restore_array` would use for a tomogram."""
    from cryowae.io import check_finite, read_volume
    from cryowae.io.stats import volume_stats
    from cryowae.tiling.pages import page_releasing

    with read_volume(path) as vol:
        try:
            return volume_stats(page_releasing(vol.data))
        except CryowaeInputError:
            check_finite(page_releasing(vol.data), name=path)  # the better message for NaNs
            raise


@dataclass(frozen=True)
class BlockTask:
    """Everything a worker needs to restore one block (paths and numbers only)."""

    input: str
    store: str  # the partial zarr store; level 0 is written
    shape: tuple[int, int, int]
    core: Core
    bid: str
    model: str
    tiles: TileSettings
    norm: tuple[float, float]


def restore_block(task: BlockTask) -> dict[str, Any]:
    """Worker task: restore one block into the store's level 0, then write its marker.

    The block is restored by the tile engine with ``core=task.core`` on the whole
    tomogram's tile plan, so it equals the single pass over the tomogram there; the
    finished Z-ranges of the core go to the store as they come (the core is a whole
    number of zarr chunks, which no other task touches).
    """
    from cryowae.inference.cluster import worker_device
    from cryowae.io import read_volume
    from cryowae.models.cache import cached_restorer
    from cryowae.tiling.engine import array_sink, model_tile_fn, run_tiles

    t0 = time.perf_counter()
    device = worker_device()
    restorer = cached_restorer(task.model, device)
    level0 = open_level0(task.store)
    with read_volume(task.input) as vol:
        if tuple(vol.shape) != tuple(task.shape):
            raise CryowaeInputError(f"{task.input}: shape changed to {vol.shape} since the "
                                    f"batch was planned ({task.shape})")
        plan = task.tiles.plan(task.shape, restorer.model.multiple)
        try:
            run_tiles(model_tile_fn(restorer), vol.data, plan, array_sink(level0),
                      norm=task.norm, device=restorer.device,
                      batch_size=task.tiles.batch_size, core=task.core, check_finite=True)
        except CryowaeInputError as exc:
            raise CryowaeInputError(f"{task.input}: block {task.bid}: {exc}") from None
    done = Path(task.store) / DONE_DIR
    done.mkdir(exist_ok=True)
    (done / task.bid).touch()
    return {"bid": task.bid, "seconds": time.perf_counter() - t0, "device": device}


@dataclass(frozen=True)
class FinalizeTask:
    """Everything a worker needs to finish one tomogram's output."""

    partial: str
    final: str
    shape: tuple[int, int, int]
    voxel_size: float
    origin: tuple[float, float, float]
    levels: int
    chunk: int
    attrs: dict[str, Any]
    mrc: str | None
    mrc_meta: dict[str, Any]
    write_zarr: bool = True  # False: the zarr is finished, only the MRC is missing


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename directory `src` to `dst`, replacing an existing `dst` (moved aside first)."""
    from cryowae.io.atomic import temporary_sibling

    if dst.exists():
        old = temporary_sibling(dst)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def write_mrc_from_zarr(store: str | os.PathLike, path: str | os.PathLike, voxel_size: float,
                        origin: tuple[float, float, float], meta: dict[str, Any] | None,
                        slab: int = 64) -> Path:
    """Copy level 0 of a zarr store into a float32 MRC (atomic, slab by slab)."""
    from cryowae.io import open_mrc_writer

    arr = open_level0(str(store), mode="r")
    with open_mrc_writer(path, tuple(arr.shape), voxel_size, origin, meta,
                         overwrite=True) as out:
        for z in range(0, arr.shape[0], slab):
            out[z:z + slab] = np.asarray(arr[z:z + slab], dtype=np.float32)
    return Path(path)


def finalize_tomogram(task: FinalizeTask) -> str:
    """Worker task: pyramid + NGFF metadata, drop the markers, rename the partial store
    to its final name; then the MRC, if asked for."""
    from cryowae.io.omezarr import OmeZarrWriter, store_name

    partial, final = Path(task.partial), Path(task.final)
    if task.write_zarr:
        if partial.is_dir():
            # the NGFF name is the final one (tomo), not *.partial
            writer = OmeZarrWriter(partial, task.shape, task.voxel_size, task.levels,
                                   (task.chunk,) * 3, (), task.origin, task.attrs,
                                   name=store_name(final))
            if "multiscales" not in dict(writer.group.attrs):
                writer.finish()
            shutil.rmtree(partial / DONE_DIR, ignore_errors=True)
            _replace_dir(partial, final)
        elif not final.is_dir():
            raise CryowaeInputError(f"{partial}: vanished before it could be finished")
    if task.mrc:
        write_mrc_from_zarr(final, task.mrc, task.voxel_size, task.origin, task.mrc_meta)
    return str(final)


__all__ = [
    "BlockTask", "FinalizeTask", "finalize_tomogram", "open_level0", "restore_block",
    "tomogram_norm", "write_mrc_from_zarr",
]
