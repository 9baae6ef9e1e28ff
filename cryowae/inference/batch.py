"""Restore many tomograms on a Dask cluster, block by block, resumably.

The unit of work is a *block*: a chunk-aligned core of ``block`` voxels per axis of one
tomogram's output (the last block of an axis may be shorter). A block task reads from
the memory-mapped (or lazy zarr) input only the region its tiles need, restores it, and
writes only its core into level 0 of the output OME-Zarr; the core is a whole number of
zarr chunks, so no two tasks ever touch one chunk.

Blocks agree with a single-pass `restore_array` of the whole tomogram (to float
rounding on CPU; on CUDA, to the bfloat16 noise of its autocast), for two reasons:

* normalisation uses the tomogram's global (mean, std), computed once per tomogram
  (one task) and passed to every block;
* a block uses the *whole tomogram's* tile grid (`cryowae.inference.tiling.plan_tiles`
  on the full shape), not a grid of its own: every tile of that grid that overlaps the
  core is restored and blended with the same window and the same (separable) weight
  sums as in the single pass. Re-tiling the block would not do: the single pass spreads
  its tiles evenly over the whole axis, and the restorer's output for a voxel depends
  on the whole tile around it (GroupNorm statistics and the latent code pool over the
  tile), so a different grid changes every voxel, not only those near block edges.
  The halo of a block is therefore exactly the tiles that overlap its core: up to one
  tile (minus a voxel) beyond the core on each side, more than the network's receptive
  field within a tile and more than the overlap. The tiles of a block go through
  `restore_array` in batches (laid side by side, with ``overlap=0``, which restores
  each of them as one tile); tiles that overlap two blocks are restored by both, so
  the work is ``block_overhead(...)`` times a single pass (with --tile 96 --overlap 32:
  about 2-2.5x for --block 256 and 1.3x for --block 512 on 300x1000x1000 to
  500x2000x2000 tomograms): a larger block costs less, and memory per worker grows
  as (block + 2 tile)^3.

Output of a tomogram ``NAME`` (the input's file name without suffix) in ``DIR``:

* while blocks are running, ``DIR/NAME.zarr.partial``: a zarr group without NGFF
  metadata (`read_volume` refuses it), whose ``.cryowae_done/`` folder holds an empty
  marker file per finished block, written after the block's chunks;
* when every block is done, a finalising task builds the pyramid and the NGFF
  metadata, removes the markers and renames the store to ``DIR/NAME.zarr``; with
  ``mrc=True`` it then writes ``DIR/NAME.mrc`` (atomically).

A rerun after a crash, a killed worker or a cancelled SLURM job does only the blocks
without a marker (the store remembers its settings and normalisation; a rerun with
other settings starts that tomogram over) and gives the same output as an
uninterrupted run. A finished ``NAME.zarr`` restored with the same settings is kept
(its blocks count as done); one made otherwise is refused unless ``overwrite``.

Workers load the checkpoint once (`cached_restorer`) on their device
(`cryowae.inference.cluster.worker_device`); tasks carry paths and settings, never models.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError
from cryowae.inference.tiling import WINDOWS, TilePlan, plan_tiles, round_up
from cryowae.progress import ProgressReporter, ensure_progress

#: folder of per-block marker files inside a partial store
DONE_DIR = ".cryowae_done"
PARTIAL_SUFFIX = ".partial"
#: group attribute holding the run's settings and normalisation
ATTR = "cryowae_batch"
#: bump when the block layout or the arithmetic changes: older partial stores restart
FORMAT = 1
#: testing hook: after this many blocks finish in a run, the driving process kills its
#: process group (itself and its local workers) with SIGKILL, like a node dying
CRASH_ENV = "CRYOWAE_BATCH_CRASH_AFTER"


# --------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class BatchSettings:
    """How every tomogram of a batch is restored (validated by `check`)."""

    model: str
    tile: int = 96
    overlap: int = 32
    batch_size: int = 4
    window: str = "cosine"
    block: int = 256
    chunk: int | None = None
    levels: int = 3
    mrc: bool = False
    overwrite: bool = False

    @property
    def out_chunk(self) -> int:
        """Edge of the output zarr chunks: `chunk`, else 64 when it divides the block,
        else the block itself."""
        if self.chunk:
            return int(self.chunk)
        return 64 if self.block % 64 == 0 else int(self.block)

    def check(self) -> None:
        if self.tile < 1:
            raise CryowaeInputError(f"--tile must be positive, got {self.tile}")
        if not 0 <= self.overlap < self.tile:
            raise CryowaeInputError(f"--overlap must be in [0, tile), got {self.overlap} "
                                    f"for tile {self.tile}")
        if self.batch_size < 1:
            raise CryowaeInputError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.window not in WINDOWS:
            raise CryowaeInputError(f"--window {self.window!r}: choose one of "
                                    f"{', '.join(WINDOWS)}")
        if self.block < 8:
            raise CryowaeInputError(f"--block must be >= 8 voxels, got {self.block}")
        if self.out_chunk < 1 or self.block % self.out_chunk:
            raise CryowaeInputError(f"--block {self.block} must be a multiple of the output "
                                    f"chunk {self.out_chunk}")
        if self.levels < 1:
            raise CryowaeInputError(f"--levels must be >= 1, got {self.levels}")


def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns)}


def _model_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def _input_id(path: Path) -> dict[str, Any]:
    if path.is_dir():  # a zarr store: its level-0 metadata and the group's
        meta = [m for m in (path / "0" / ".zarray", path / "0" / "zarr.json",
                            path / ".zattrs", path / "zarr.json") if m.exists()]
        ids = [_file_id(m) for m in meta]
        return {"path": str(path.resolve()), "size": sum(i["size"] for i in ids),
                "mtime_ns": max((i["mtime_ns"] for i in ids), default=0)}
    return _file_id(path)


# --------------------------------------------------------------------------- geometry

def block_grid(shape: Sequence[int], block: int) -> list[tuple[tuple[int, int], ...]]:
    """Cores ``((z0, z1), (y0, y1), (x0, x1))`` of the blocks of a volume, z-major."""
    ranges = [[(s, min(s + block, n)) for s in range(0, n, block)] for n in shape]
    return [tuple(c) for c in itertools.product(*ranges)]


def block_id(core: Sequence[tuple[int, int]], block: int) -> str:
    """Marker name of a block: ``z{i}-y{j}-x{k}`` (its index in the block grid)."""
    return "-".join(f"{a}{c[0] // block}" for a, c in zip("zyx", core, strict=True))


def resolve_tile(tile: int, overlap: int, multiple: int) -> int:
    """The tile edge `restore_array` uses: `tile` rounded up to the model's multiple."""
    t = round_up(int(tile), int(multiple))
    if overlap >= t:
        raise CryowaeInputError(f"--overlap {overlap} must be smaller than the tile ({t})")
    return t


def global_plan(shape: Sequence[int], tile: int, overlap: int, multiple: int,
                window: str = "cosine") -> TilePlan:
    """The tile grid of a single-pass `restore_array` over a volume of `shape`."""
    t = resolve_tile(tile, overlap, multiple)
    return plan_tiles(tuple(int(s) for s in shape), t, overlap, multiple, window)


def tiles_for_core(plan: TilePlan, core: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per axis, the tile starts (padded coordinates) whose real range overlaps the core."""
    out = []
    for ax, (c0, c1) in zip(plan.axes, core, strict=True):
        out.append([s for s in ax.starts if ax.real_range(s)[0] < c1
                    and ax.real_range(s)[1] > c0])
    return out


def block_overhead(shape: Sequence[int], block: int, plan: TilePlan) -> float:
    """Tiles restored by all blocks over tiles of one pass (>= 1): tiles that overlap
    several blocks are restored once per block."""
    total = 1.0
    for a, ax in enumerate(plan.axes):
        n = 0
        for c0 in range(0, shape[a], block):
            c1 = min(c0 + block, shape[a])
            n += sum(1 for s in ax.starts if ax.real_range(s)[0] < c1
                     and ax.real_range(s)[1] > c0)
        total *= n / len(ax.starts)
    return total


# --------------------------------------------------------------------------- worker side

_MODEL_LOCK = threading.Lock()
_MODEL_CACHE: dict[tuple[Any, ...], Any] = {}
_MODEL_LOADS = 0


def cached_restorer(model: str | os.PathLike, device: str):
    """The `LoadedRestorer` of `model` on `device`, loaded once per worker process.

    Keyed by (resolved path, size, mtime, device): a checkpoint rewritten in place is
    reloaded. Only the latest model is kept.
    """
    global _MODEL_LOADS
    from cryowae.models.checkpoint import load_restorer

    f = _model_file(model)
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns, str(device))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE.clear()
            _MODEL_CACHE[key] = load_restorer(f, device)
            _MODEL_LOADS += 1
        return _MODEL_CACHE[key]


def model_cache_info() -> dict[str, Any]:
    """How often this process loaded a checkpoint, and what it holds (for tests)."""
    return {"loads": _MODEL_LOADS, "cached": [k[0] for k in _MODEL_CACHE]}


@dataclass(frozen=True)
class BlockTask:
    """Everything a worker needs to restore one block (paths and numbers only)."""

    input: str
    store: str  # the partial zarr store; level 0 is written
    shape: tuple[int, int, int]
    core: tuple[tuple[int, int], ...]
    bid: str
    model: str
    tile: int
    overlap: int
    batch_size: int
    window: str
    norm: tuple[float, float]


def _take(a: np.ndarray, idx: Sequence[np.ndarray]) -> np.ndarray:
    sl = []
    for i in idx:
        if len(i) and np.all(np.diff(i) == 1):
            sl.append(slice(int(i[0]), int(i[-1]) + 1))
        else:
            sl.append(None)
    if all(s is not None for s in sl):
        return a[tuple(sl)]
    return a[np.ix_(*idx)]


def _stack_axis(tile: Sequence[int]) -> int:
    """Axis to lay tiles side by side along: the longest tile edge, X first (so that one
    `restore_array` row holds them all and they are batched)."""
    return next(a for a in (2, 1, 0) if tile[a] == max(tile))


def restore_tiles(restorer: Any, tiles: np.ndarray, batch_size: int) -> np.ndarray:
    """Network outputs (B, Z, Y, X) for normalised tiles (B, Z, Y, X), through
    `restore_array`: the tiles are laid side by side and restored with ``overlap=0``,
    ``norm=(0, 1)`` and a flat window, which cuts the row back into exactly these tiles
    (each restored on its own, like in a tiled pass)."""
    from cryowae.inference.restore import restore_array

    n, shape = len(tiles), tiles.shape[1:]
    axis = _stack_axis(shape)
    row = np.concatenate(list(tiles), axis=axis) if n > 1 else tiles[0]
    out = restore_array(restorer, row, tile=int(shape[axis]), overlap=0,
                        batch_size=batch_size, window="flat", norm=(0.0, 1.0))
    return np.stack(np.split(np.asarray(out), n, axis=axis)) if n > 1 else out[None]


def restore_block_array(restorer: Any, data: Any, core: Sequence[tuple[int, int]],
                        tile: int = 96, overlap: int = 32, batch_size: int = 4,
                        window: str = "cosine",
                        norm: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Restore the core ``((z0, z1), (y0, y1), (x0, x1))`` of a (Z, Y, X) volume exactly
    as a single-pass ``restore_array(restorer, data, tile, overlap, batch_size, window,
    norm=norm)`` would, reading only the tiles that overlap the core. float32."""
    shape = tuple(int(s) for s in data.shape)
    plan = global_plan(shape, tile, overlap, restorer.model.multiple, window)
    starts = tiles_for_core(plan, core)
    idx = [{s: ax.real_indices(s) for s in st} for ax, st in zip(plan.axes, starts,
                                                                  strict=True)]
    lo = [min(int(i.min()) for i in d.values()) for d in idx]
    hi = [max(int(i.max()) for i in d.values()) + 1 for d in idx]
    region = np.asarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    if not np.all(np.isfinite(region)):
        raise CryowaeInputError(f"NaN or infinite voxels in z {lo[0]}-{hi[0] - 1}, y {lo[1]}-"
                                f"{hi[1] - 1}, x {lo[2]}-{hi[2] - 1} of the input")
    mean, std = float(norm[0]), float(norm[1])
    win = plan.tile_window()
    acc = np.zeros(tuple(c1 - c0 for c0, c1 in core), dtype=np.float32)
    combos = list(itertools.product(*starts))
    group = max(2, 2 * int(batch_size))
    for g0 in range(0, len(combos), group):
        chosen = combos[g0:g0 + group]
        tiles = np.empty((len(chosen), *plan.tile), dtype=np.float32)
        for k, st in enumerate(chosen):
            tiles[k] = _take(region, [idx[a][s] - lo[a] for a, s in enumerate(st)])
        tiles -= mean
        tiles /= std
        outs = restore_tiles(restorer, tiles, batch_size)
        for k, st in enumerate(chosen):
            src, dst = [], []
            for a, s in enumerate(st):
                ax = plan.axes[a]
                r0, r1 = ax.real_range(s)
                r0, r1 = max(r0, core[a][0]), min(r1, core[a][1])
                off = s - ax.pad_before  # real index of the tile's first voxel
                src.append(slice(r0 - off, r1 - off))
                dst.append(slice(r0 - core[a][0], r1 - core[a][0]))
            acc[tuple(dst)] += outs[k][tuple(src)] * win[tuple(src)]
    az, ay, ax_ = plan.axes
    wz = az.weight_sum(plan.window).astype(np.float32)[core[0][0]:core[0][1]]
    wyx = np.outer(ay.weight_sum(plan.window), ax_.weight_sum(plan.window)).astype(
        np.float32)[core[1][0]:core[1][1], core[2][0]:core[2][1]]
    acc /= wz[:, None, None]
    acc /= wyx[None]
    acc *= std
    acc += mean
    return acc


def _open_level0(store: str, mode: str = "r+"):
    import zarr

    return zarr.open_array(str(Path(store) / "0"), mode=mode, zarr_format=2)


def restore_block(task: BlockTask) -> dict[str, Any]:
    """Worker task: restore one block, write its core to the store, then its marker."""
    from cryowae.inference.cluster import worker_device
    from cryowae.io import read_volume

    t0 = time.perf_counter()
    device = worker_device()
    restorer = cached_restorer(task.model, device)
    vol = read_volume(task.input)
    try:
        if tuple(vol.shape) != tuple(task.shape):
            raise CryowaeInputError(f"{task.input}: shape changed to {vol.shape} since the "
                                    f"batch was planned ({task.shape})")
        try:
            core = restore_block_array(restorer, vol.data, task.core, task.tile, task.overlap,
                                       task.batch_size, task.window, task.norm)
        except CryowaeInputError as exc:
            raise CryowaeInputError(f"{task.input}: {exc}") from None
    finally:
        handle = vol.meta.get("_mrc_handle")
        if handle is not None:
            handle.close()
    if not np.all(np.isfinite(core)):
        raise CryowaeInputError(f"{task.input}: the restorer produced NaN or infinite values "
                                f"in block {task.bid}")
    arr = _open_level0(task.store)
    arr[tuple(slice(c0, c1) for c0, c1 in task.core)] = core
    done = Path(task.store) / DONE_DIR
    done.mkdir(exist_ok=True)
    (done / task.bid).touch()
    return {"bid": task.bid, "seconds": time.perf_counter() - t0, "device": device}


def tomogram_norm(path: str) -> tuple[float, float]:
    """Worker task: the global (mean, std) `restore_array` would use for a tomogram."""
    from cryowae.inference.restore import page_releasing
    from cryowae.io import check_finite, read_volume
    from cryowae.io.stats import volume_stats

    vol = read_volume(path)
    try:
        try:
            return volume_stats(page_releasing(vol.data))
        except CryowaeInputError:
            check_finite(page_releasing(vol.data), name=path)  # the better message for NaNs
            raise
    finally:
        handle = vol.meta.get("_mrc_handle")
        if handle is not None:
            handle.close()


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

    arr = _open_level0(str(store), mode="r")
    with open_mrc_writer(path, tuple(arr.shape), voxel_size, origin, meta,
                         overwrite=True) as out:
        for z in range(0, arr.shape[0], slab):
            out[z:z + slab] = np.asarray(arr[z:z + slab], dtype=np.float32)
    return Path(path)


def finalize_tomogram(task: FinalizeTask) -> str:
    """Worker task: pyramid + NGFF metadata, drop the markers, rename the partial store
    to its final name; then the MRC, if asked for."""
    from cryowae.io.omezarr import OmeZarrWriter

    partial, final = Path(task.partial), Path(task.final)
    if task.write_zarr:
        if partial.is_dir():
            writer = OmeZarrWriter(partial, task.shape, task.voxel_size, task.levels,
                                   (task.chunk,) * 3, (), task.origin, task.attrs)
            if "multiscales" not in dict(writer.group.attrs):
                writer.path = final  # the NGFF name is the final one, not *.partial
                writer.finish()
            shutil.rmtree(partial / DONE_DIR, ignore_errors=True)
            _replace_dir(partial, final)
        elif not final.is_dir():
            raise CryowaeInputError(f"{partial}: vanished before it could be finished")
    if task.mrc:
        write_mrc_from_zarr(final, task.mrc, task.voxel_size, task.origin, task.mrc_meta)
    return str(final)


# --------------------------------------------------------------------------- planning

@dataclass
class TomogramJob:
    """One tomogram of a batch, as planned on the client."""

    index: int
    input: Path
    name: str
    final: Path
    partial: Path
    mrc: Path | None
    shape: tuple[int, int, int]
    voxel_size: float
    origin: tuple[float, float, float]
    mrc_meta: dict[str, Any]
    fingerprint: dict[str, Any]
    cores: list[tuple[tuple[int, int], ...]]
    done: set[str] = field(default_factory=set)
    norm: tuple[float, float] | None = None
    #: "restore" (blocks to run), "finish" (all blocks done, store not finalised),
    #: "mrc" (zarr finished, MRC missing), "done" (nothing to do)
    state: str = "restore"

    @property
    def n_blocks(self) -> int:
        return len(self.cores)


def output_name(path: str | os.PathLike) -> str:
    """Output name of an input: its file name without ``.mrc``/``.rec``/``.zarr``/
    ``.ome.zarr``... suffixes."""
    name = Path(path).name
    for suffix in (".ome.zarr", ".zarr", ".mrc", ".rec", ".map", ".st", ".mrcs", ".ali"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def _read_attrs(store: Path) -> dict[str, Any]:
    try:
        import zarr

        return dict(zarr.open_group(str(store), mode="r").attrs)
    except Exception:  # not a zarr group, or a broken one
        return {}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _markers(partial: Path, names: set[str]) -> set[str]:
    d = partial / DONE_DIR
    if not d.is_dir():
        return set()
    return {n for n in os.listdir(d) if n in names}


def plan_batch(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
               settings: BatchSettings, multiple: int,
               progress: ProgressReporter | None = None) -> list[TomogramJob]:
    """Read every input's header, and find out what is left to do for each.

    Raises `CryowaeInputError` (before any work starts) for an unreadable input, two
    inputs with one output name, or a finished output that `settings` may not replace.
    """
    from cryowae.io import read_volume

    progress = ensure_progress(progress)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CryowaeInputError(f"--out {out}: exists and is not a directory")
    model_id = _file_id(_model_file(settings.model))
    tile = resolve_tile(settings.tile, settings.overlap, multiple)
    jobs: list[TomogramJob] = []
    names: dict[str, Path] = {}
    for i, inp in enumerate(inputs):
        p = Path(inp)
        vol = read_volume(p)
        handle = vol.meta.get("_mrc_handle")
        if handle is not None:
            handle.close()
        name = output_name(p)
        if name in names:
            raise CryowaeInputError(f"{p} and {names[name]} would both be written to "
                                    f"{out / (name + '.zarr')}; rename one")
        names[name] = p
        shape = vol.shape
        if min(shape) < 1:
            raise CryowaeInputError(f"{p}: empty volume {shape}")
        fp = {"format": FORMAT, "input": _input_id(p), "model": model_id, "tile": tile,
              "overlap": settings.overlap, "window": settings.window,
              "block": settings.block, "chunk": settings.out_chunk,
              "levels": settings.levels, "shape": list(shape)}
        cores = block_grid(shape, settings.block)
        final = out / f"{name}.zarr"
        job = TomogramJob(
            index=i, input=p, name=name, final=final,
            partial=out / f"{name}.zarr{PARTIAL_SUFFIX}",
            mrc=out / f"{name}.mrc" if settings.mrc else None, shape=shape,
            voxel_size=float(vol.voxel_size), origin=tuple(vol.origin),
            mrc_meta={k: vol.meta[k] for k in ("mrc_labels", "mrc_nstart") if k in vol.meta},
            fingerprint=fp, cores=cores)
        ids = {block_id(c, settings.block) for c in cores}
        if final.exists() and not settings.overwrite:
            attrs = _read_attrs(final)
            rec = attrs.get(ATTR, {})
            if "multiscales" in attrs and _same(rec.get("settings", {}), fp):
                job.done, job.norm = ids, tuple(rec["norm"])
                job.state = "mrc" if job.mrc is not None and not job.mrc.exists() else "done"
                jobs.append(job)
                continue
            raise CryowaeInputError(f"output {final} exists (made from other inputs or "
                                    "settings); pass --overwrite to replace it")
        if job.mrc is not None and job.mrc.exists() and not settings.overwrite:
            raise CryowaeInputError(f"output {job.mrc} exists; pass --overwrite to replace it")
        if job.partial.exists():
            attrs = _read_attrs(job.partial)
            rec = attrs.get(ATTR, {})
            if rec and _same(rec.get("settings", {}), fp) and rec.get("norm"):
                job.norm = tuple(rec["norm"])
                if "multiscales" in attrs:
                    job.done, job.state = ids, "finish"
                else:
                    job.done = _markers(job.partial, ids)
                    job.state = "finish" if len(job.done) == len(ids) else "restore"
            else:
                progress.log(f"{name}: the interrupted run used other inputs or settings; "
                             "starting this tomogram over")
                shutil.rmtree(job.partial)
        jobs.append(job)
    return jobs


def _attrs(job: TomogramJob) -> dict[str, Any]:
    return {ATTR: {"settings": job.fingerprint, "norm": list(job.norm or ()),
                   "source": str(job.input)}}


def _create_partial(job: TomogramJob, settings: BatchSettings) -> None:
    from cryowae.io.omezarr import OmeZarrWriter

    job.partial.parent.mkdir(parents=True, exist_ok=True)
    OmeZarrWriter(job.partial, job.shape, job.voxel_size, settings.levels,
                  (settings.out_chunk,) * 3, (), job.origin, _attrs(job))
    (job.partial / DONE_DIR).mkdir(exist_ok=True)


# --------------------------------------------------------------------------- the driver

@dataclass
class BatchResult:
    """What `restore_batch` did."""

    outputs: list[Path]
    blocks_total: int
    blocks_run: int
    blocks_already_done: int
    skipped: list[Path]  # finished outputs kept as they were
    failed: dict[str, str]  # input -> one-line reason
    elapsed_s: float
    workers: int
    overhead: float  # tiles restored by the blocks / tiles of single passes

    def summary(self) -> str:
        n_ok = len(self.outputs)
        return (f"restored {n_ok} tomogram{'s' if n_ok != 1 else ''} "
                f"({len(self.skipped)} already finished); blocks: {self.blocks_total} total, "
                f"{self.blocks_run} restored in this run, {self.blocks_already_done} already "
                f"done; {self.elapsed_s:.1f} s on {self.workers} worker"
                f"{'s' if self.workers != 1 else ''}")


def _crash_after() -> int | None:
    v = os.environ.get(CRASH_ENV)
    return int(v) if v and v.strip().isdigit() else None


def _crash() -> None:
    """Die like a node losing power: SIGKILL this process and its local workers."""
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _error_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__


def restore_batch(inputs: Sequence[str | os.PathLike], model: str | os.PathLike,
                  out_dir: str | os.PathLike, *, block: int = 256, chunk: int | None = None,
                  tile: int = 96, overlap: int = 32, batch_size: int = 4,
                  window: str = "cosine", levels: int = 3, mrc: bool = False,
                  overwrite: bool = False, client: Any = None, cluster: str = "local",
                  cluster_config: str | os.PathLike | None = None,
                  workers: int | None = None,
                  progress: ProgressReporter | None = None) -> BatchResult:
    """Restore tomograms `inputs` into ``out_dir/<name>.zarr`` on a Dask cluster.

    Parameters
    ----------
    inputs
        MRC files or OME-Zarr stores, read memory-mapped / lazily by the workers.
    model
        ``model.pt`` (or a run directory holding one), loaded once per worker.
    out_dir
        Output folder (created). See the module docstring for the layout.
    block
        Edge of a block's core (voxels), a multiple of the output `chunk` (default 64,
        or the block itself when 64 does not divide it).
    tile, overlap, batch_size, window
        As `restore_array`; the result equals its single pass up to float rounding.
    levels
        Pyramid levels of the OME-Zarr output.
    mrc
        Also write ``out_dir/<name>.mrc``.
    overwrite
        Replace finished outputs; otherwise one restored with the same settings is
        kept, one restored otherwise is refused.
    client
        A `distributed.Client` to use (left open). Default: start a cluster with
        `cryowae.inference.cluster.make_cluster(cluster, cluster_config, workers)` and
        close it at the end.
    progress
        Reporter over blocks (its total includes blocks already done) and messages;
        `progress.cancel()` stops the run (finished blocks stay recorded).

    Returns a `BatchResult`; failed tomograms are listed there (their finished blocks
    are kept for a rerun), the others are finished.
    """
    from distributed import Client, as_completed

    from cryowae.inference.cluster import BLOCK_RESOURCE, DevicePlugin, load_slurm_config
    from cryowae.models.checkpoint import load_restorer

    progress = ensure_progress(progress)
    t_start = time.perf_counter()
    if not inputs:
        raise CryowaeInputError("no input tomograms given")
    # absolute paths: workers (SLURM jobs) may start in another directory
    inputs = [Path(os.path.abspath(p)) for p in inputs]
    model, out_dir = os.path.abspath(model), os.path.abspath(out_dir)
    settings = BatchSettings(model=str(model), tile=int(tile), overlap=int(overlap),
                             batch_size=int(batch_size), window=window, block=int(block),
                             chunk=chunk, levels=int(levels), mrc=bool(mrc),
                             overwrite=bool(overwrite))
    settings.check()
    slurm_cfg = None
    if client is None and cluster == "slurm":
        slurm_cfg = load_slurm_config(cluster_config)
    elif client is None and cluster != "local":
        raise CryowaeInputError(f"--cluster {cluster!r}: choose local or slurm")
    if workers is not None and workers < 1:
        raise CryowaeInputError(f"--workers must be >= 1, got {workers}")
    loaded = load_restorer(model, "cpu")  # validates the checkpoint on the client
    multiple = loaded.model.multiple
    jobs = plan_batch(inputs, out_dir, settings, multiple, progress)
    from cryowae.inference.restore import voxel_size_warning

    for job in jobs:
        warning = voxel_size_warning(job.voxel_size, loaded.voxel_size)
        if warning and job.state != "done":
            progress.log(f"{job.name}: {warning}")
    del loaded
    t_eff = resolve_tile(settings.tile, settings.overlap, multiple)
    overhead_num = overhead_den = 0.0
    for job in jobs:
        plan = global_plan(job.shape, t_eff, settings.overlap, multiple, settings.window)
        overhead_num += block_overhead(job.shape, settings.block, plan) * plan.n_tiles
        overhead_den += plan.n_tiles
    overhead = overhead_num / max(overhead_den, 1.0)
    total = sum(j.n_blocks for j in jobs)
    already = sum(len(j.done) for j in jobs)
    skipped = [j.final for j in jobs if j.state == "done"]
    for j in jobs:
        if j.state == "done":
            progress.log(f"{j.name}: already restored with these settings, kept {j.final}")
    result = BatchResult(outputs=list(skipped), blocks_total=total, blocks_run=0,
                         blocks_already_done=already, skipped=skipped, failed={},
                         elapsed_s=0.0, workers=0, overhead=overhead)
    todo = [j for j in jobs if j.state != "done"]
    if not todo:
        result.elapsed_s = time.perf_counter() - t_start
        return result
    if overhead > 1.5:
        progress.log(f"blocks of {settings.block} restore {overhead:.1f}x the tiles of a "
                     f"single pass (tiles at block borders are done twice); a larger "
                     "--block lowers this")

    own_cluster, cpu_threads = None, None
    if client is None:
        from cryowae.inference.cluster import count_gpus, make_cluster

        own_cluster = make_cluster(cluster, slurm_cfg, workers)
        client = Client(own_cluster)
        if cluster == "local":  # CPU workers share this machine's cores
            cpu_threads = max(1, (os.cpu_count() or 1) // (workers or max(1, count_gpus())))
    crash_after = _crash_after()
    try:
        client.register_plugin(DevicePlugin(cpu_threads), name=DevicePlugin.name)
        if cluster == "slurm" and own_cluster is not None:
            progress.log(f"SLURM jobs submitted; blocks start as workers join (dashboard: "
                         f"{getattr(own_cluster, 'dashboard_link', '-')})")
        # a client of ours has the BLOCK resource on every worker; someone else's may not
        block_resources = {BLOCK_RESOURCE: 1} if own_cluster is not None or any(
            BLOCK_RESOURCE in (w.get("resources") or {})
            for w in client.scheduler_info().get("workers", {}).values()) else None
        run_id = uuid.uuid4().hex[:8]
        ac = as_completed()
        info: dict[Any, tuple[str, TomogramJob, str]] = {}
        pending: dict[str, int] = {}
        all_futures: dict[str, list[Any]] = {}

        def submit(fn: Any, arg: Any, kind: str, job: TomogramJob, key: str,
                   priority: int, resources: dict[str, int] | None = None) -> None:
            fut = client.submit(fn, arg, key=f"cryowae-{kind}-{job.name}-{key}-{run_id}",
                                priority=priority, resources=resources, retries=1)
            info[fut] = (kind, job, key)
            all_futures.setdefault(job.name, []).append(fut)
            ac.add(fut)

        def submit_finalize(job: TomogramJob) -> None:
            task = FinalizeTask(
                partial=str(job.partial), final=str(job.final), shape=job.shape,
                voxel_size=job.voxel_size, origin=job.origin, levels=settings.levels,
                chunk=settings.out_chunk, attrs=_attrs(job),
                mrc=str(job.mrc) if job.mrc is not None else None, mrc_meta=job.mrc_meta,
                write_zarr=job.state != "mrc")
            submit(finalize_tomogram, task, "finish", job, "all", 1000 - job.index)

        def submit_blocks(job: TomogramJob) -> None:
            if not job.partial.exists():
                _create_partial(job, settings)
            left = [c for c in job.cores if block_id(c, settings.block) not in job.done]
            pending[job.name] = len(left)
            if not left:
                submit_finalize(job)
                return
            for core in left:
                bid = block_id(core, settings.block)
                task = BlockTask(input=str(job.input), store=str(job.partial),
                                 shape=job.shape, core=core, bid=bid,
                                 model=str(settings.model), tile=settings.tile,
                                 overlap=settings.overlap, batch_size=settings.batch_size,
                                 window=settings.window, norm=job.norm)  # type: ignore[arg-type]
                submit(restore_block, task, "block", job, bid, -job.index, block_resources)

        progress.start(total, "restoring blocks", done=already)
        for job in todo:
            if job.state in ("finish", "mrc"):
                submit_finalize(job)
            elif job.norm is None:
                submit(tomogram_norm, str(job.input), "norm", job, "stats", 500 - job.index)
            else:
                submit_blocks(job)
        for fut in ac:
            kind, job, key = info.pop(fut)
            if progress.cancelled:
                for futs in all_futures.values():
                    client.cancel(futs)
                raise CryowaeInputError("restore-batch cancelled; finished blocks are kept "
                                        "for a rerun")
            if job.name in result.failed:
                continue
            if fut.status != "finished":
                exc = fut.exception() if fut.status == "error" else None
                what = f"block {key}" if kind == "block" else kind
                result.failed[str(job.input)] = f"{what}: {_error_line(exc)}"
                client.cancel(all_futures.get(job.name, []))
                progress.log(f"{job.name}: failed ({what}: {_error_line(exc)}); its finished "
                             "blocks are kept for a rerun")
                continue
            if kind == "norm":
                job.norm = tuple(float(v) for v in fut.result())
                submit_blocks(job)
            elif kind == "block":
                fut.release()
                result.blocks_run += 1
                job.done.add(key)
                pending[job.name] -= 1
                progress.advance(1)
                if crash_after is not None and result.blocks_run >= crash_after:
                    _crash()
                if pending[job.name] == 0:
                    submit_finalize(job)
            else:
                result.outputs.append(job.final)
                progress.log(f"{job.name}: finished {job.final}"
                             + (f" and {job.mrc}" if job.mrc is not None else ""))
        result.workers = len(client.scheduler_info().get("workers", {}))
    finally:
        progress.finish()
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    result.elapsed_s = time.perf_counter() - t_start
    return result


__all__ = [
    "ATTR", "CRASH_ENV", "DONE_DIR", "FORMAT", "PARTIAL_SUFFIX", "BatchResult",
    "BatchSettings", "BlockTask", "FinalizeTask", "TomogramJob", "block_grid", "block_id",
    "block_overhead", "cached_restorer", "finalize_tomogram", "global_plan",
    "model_cache_info", "output_name", "plan_batch", "resolve_tile", "restore_block",
    "restore_block_array", "restore_batch", "restore_tiles", "tiles_for_core",
    "tomogram_norm", "write_mrc_from_zarr",
]
