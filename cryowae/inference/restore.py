"""Restore whole tomograms with a trained restorer: tiled, blended, bounded in memory.

The tomogram is normalised with its global mean and standard deviation (as in training),
cut into overlapping tiles (`cryowae.inference.tiling`), the tiles go through the network
in batches, and their outputs are blended with a window that vanishes towards the tile
edges, so no grid of seams appears. Memory does not grow with the tomogram's thickness:
one row of tiles along Z is processed at a time, its weighted outputs accumulate in a
buffer one tile thick, and every Z-range that no later tile touches is divided by the
(separable) weight sum, de-normalised and written out at once. Pages of memory-mapped
inputs and outputs are handed back to the kernel as the work moves on, so even the
resident size of the process stays near one slab (tile x Y x X float32) plus the
network's working set for one batch of tiles (which dominates: ~0.9 GB for two 96^3
tiles through a channels=12 restorer on the CPU; see benchmarks/bench_restore.py).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.devices import resolve_device
from cryowae.errors import CryowaeInputError
from cryowae.inference.tiling import TilePlan, plan_tiles, round_up
from cryowae.progress import ProgressReporter, ensure_progress

#: What `restore_file` does with even/odd halves by default: "average" restores each half
#: and averages the two (DeepDeWedge/IsoNet practice); "full" restores the full tomogram
#: in one pass and uses the halves only to check their shape. Measured with
#: benchmarks/bench_restore.py --part quality (96x96x48 `cryowae simulate` tomograms, a
#: noise2noise restorer channels=8/depth=2 trained on seed 1, tile 48/overlap 16), Pearson
#: correlation to the ground truth, one pass on full vs halves averaged:
#:   600 steps:  seed 1 0.3284 vs 0.3212, seed 2 0.3215 vs 0.3127, seed 3 0.3162 vs 0.3084
#:               (Fourier correlation in the missing wedge 0.222/0.243/0.224 vs
#:               0.210/0.223/0.212; PSNR +0.05 dB; FSC 0.143 0.1-0.15 A better)
#:    46 steps:  seed 1 0.2992 vs 0.2903, seed 2 0.2889 vs 0.2805, seed 3 0.2854 vs 0.2764
#:   281 steps:  seed 1 0.4148 vs 0.4161, seed 2 0.4047 vs 0.4066 (halves ahead by 0.002,
#:               missing-wedge correlation +0.016 to +0.019; FSC 0.143 0.15 A worse)
#: The single pass was as good or better in 6 of 8 comparisons, by up to 0.009, and the
#: halves won the other two by 0.002 while costing twice the compute: default "full".
DEFAULT_HALVES_MODE = "full"
HALVES_MODES = ("average", "full")

#: Relative voxel-size mismatch above which `restore_file` warns.
VOXEL_SIZE_TOLERANCE = 0.10


class RestoreCancelled(CryowaeInputError):
    """The user cancelled a restoration (progress.cancel()); nothing was written."""


# --------------------------------------------------------------------------- memory maps

def _mmap_of(arr: Any) -> mmap.mmap | None:
    """The shared `mmap.mmap` behind a numpy memmap (or a view of one), else None."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or getattr(arr, "mode", "r") == "c":  # copy-on-write: never drop pages
        return None
    return mm if isinstance(mm, mmap.mmap) and not mm.closed else None


def release_pages(arr: Any, flush: bool = False) -> None:
    """Drop the resident pages of a memory-mapped array from this process (best effort).

    Reading or writing a memory map leaves its pages counted in the process's resident
    size until the kernel needs them back; restoring a 10 GB tomogram would show 20 GB
    resident. The data stays in the file (and the page cache), so nothing is lost: a
    later access reads it back. With `flush`, dirty pages are written (msync) first.
    Does nothing for arrays that are not memory maps (numpy, zarr).
    """
    mm = _mmap_of(arr)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        if flush:
            mm.flush()
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


class _PageReleasingReader:
    """Array-like view of a memory map whose reads copy and then release the pages."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self.data[key])
        release_pages(self.data)
        return out


def page_releasing(data: Any) -> Any:
    """Wrap a memory-mapped array so slab-wise scans (statistics, NaN checks) do not
    leave it resident; other arrays are returned unchanged."""
    return _PageReleasingReader(data) if _mmap_of(data) is not None else data


# --------------------------------------------------------------------------- the network

def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg
                                              or "can't allocate memory" in msg)  # CPU


class _TileRunner:
    """Runs batches of tiles through the model; halves the batch on out-of-memory."""

    def __init__(self, model: torch.nn.Module, device: torch.device, batch_size: int,
                 window: np.ndarray, progress: ProgressReporter) -> None:
        self.model = model
        self.device = device
        self.batch = max(1, int(batch_size))
        self.window = torch.from_numpy(window).to(device)
        self.progress = progress

    def _forward(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(self.device, non_blocking=True)[:, None]
        amp = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
               else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            y = self.model(t)
        if isinstance(y, tuple | list):
            y = y[0]
        y = y[:, 0].float() * self.window
        return y.cpu().numpy()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Weighted outputs (B, Z, Y, X) float32 for normalised tiles (B, Z, Y, X)."""
        out, i = [], 0
        while i < len(tiles):
            n = min(self.batch, len(tiles) - i)
            try:
                out.append(self._forward(tiles[i:i + n]))
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if n == 1:
                    shape = "x".join(str(s) for s in tiles.shape[1:])
                    raise CryowaeInputError(
                        f"out of memory restoring a single {shape} tile on {self.device}; "
                        "use a smaller --tile or --device cpu") from None
                self.batch = max(1, n // 2)
                self.progress.log(f"out of memory with batch {n}: fell back to batch "
                                  f"{self.batch}")
                continue
            i += n
        return np.concatenate(out) if len(out) > 1 else out[0]


def _model_multiple(model: torch.nn.Module) -> int:
    return int(getattr(model, "multiple", 1) or 1)


def _check_params(tile: int, overlap: int, batch_size: int) -> None:
    if tile < 1:
        raise CryowaeInputError(f"--tile must be positive, got {tile}")
    if overlap < 0:
        raise CryowaeInputError(f"--overlap must be >= 0, got {overlap}")
    if batch_size < 1:
        raise CryowaeInputError(f"--batch-size must be >= 1, got {batch_size}")


def _resolve_tile(model: torch.nn.Module, tile: int, overlap: int,
                  progress: ProgressReporter) -> int:
    _check_params(tile, overlap, 1)
    m = _model_multiple(model)
    t = round_up(tile, m)
    if t != tile:
        progress.log(f"tile {tile} rounded up to {t} (the restorer needs a multiple of {m})")
    if overlap >= t:
        raise CryowaeInputError(f"--overlap {overlap} must be smaller than the tile ({t})")
    return t


# --------------------------------------------------------------------------- the slab loop

def _as_index(idx: np.ndarray) -> slice | np.ndarray:
    """A slice when `idx` is a run of consecutive indices (the usual case), else `idx`."""
    if len(idx) and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


def _take(a: np.ndarray, zi: Any, yi: Any, xi: Any) -> np.ndarray:
    """``a[zi, yi, xi]`` as an outer (per-axis) selection, each index a slice or array."""
    if all(isinstance(i, slice) for i in (zi, yi, xi)):
        return a[zi, yi, xi]
    full = [np.arange(a.shape[d])[i] if isinstance(i, slice) else i
            for d, i in enumerate((zi, yi, xi))]
    return a[np.ix_(*full)]


def _restore_slabs(runner: _TileRunner, data: Any, plan: TilePlan, norm: tuple[float, float],
                   progress: ProgressReporter) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(z0, z1, block)``: the restoration of real slices ``[z0, z1)`` in normalised
    units (float32, shape (z1 - z0, Y, X)), in increasing z, covering the whole volume.

    The block is a view of the internal accumulator, valid until the next iteration.
    """
    az, ay, ax = plan.axes
    ny, nx = ay.size, ax.size
    mean, std = float(norm[0]), float(norm[1])
    wsum_z = az.weight_sum(plan.window).astype(np.float32)
    wsum_yx = np.outer(ay.weight_sum(plan.window), ax.weight_sum(plan.window)).astype(
        np.float32)
    acc = np.zeros((min(az.tile, az.size), ny, nx), dtype=np.float32)
    acc_z0 = 0  # real z of acc[0]; everything below it has been yielded
    yx_tiles = [(ys, xs) for ys in ay.starts for xs in ax.starts]
    y_idx = {ys: _as_index(ay.real_indices(ys)) for ys in ay.starts}
    x_idx = {xs: _as_index(ax.real_indices(xs)) for xs in ax.starts}
    for row, zs in enumerate(az.starts):
        zi = az.real_indices(zs)
        z_lo, z_hi = int(zi.min()), int(zi.max()) + 1
        slab = np.asarray(data[z_lo:z_hi])  # a view for memory maps, a copy for zarr
        zi_rel = _as_index(zi - z_lo)
        rz0, rz1 = az.real_range(zs)
        if rz1 - acc_z0 > acc.shape[0]:  # (only when tiles shrink the padding; rare)
            grown = np.zeros((rz1 - acc_z0, ny, nx), dtype=np.float32)
            grown[:acc.shape[0]] = acc
            acc = grown
        b0 = 0
        while b0 < len(yx_tiles):  # runner.batch may shrink on out-of-memory errors
            if progress.cancelled:
                raise RestoreCancelled("restoration cancelled; no output was written")
            group = yx_tiles[b0:b0 + runner.batch]
            b0 += len(group)
            tiles = np.empty((len(group), *plan.tile), dtype=np.float32)
            for k, (ys, xs) in enumerate(group):
                tiles[k] = _take(slab, zi_rel, y_idx[ys], x_idx[xs])
            tiles -= mean
            tiles /= std
            outs = runner(tiles)
            for k, (ys, xs) in enumerate(group):
                ry0, ry1 = ay.real_range(ys)
                rx0, rx1 = ax.real_range(xs)
                oz, oy, ox = (rz0 - (zs - az.pad_before), ry0 - (ys - ay.pad_before),
                              rx0 - (xs - ax.pad_before))
                acc[rz0 - acc_z0:rz1 - acc_z0, ry0:ry1, rx0:rx1] += outs[
                    k, oz:oz + rz1 - rz0, oy:oy + ry1 - ry0, ox:ox + rx1 - rx0]
            progress.advance(len(group))
            release_pages(data)  # keeps only one batch of tiles of a memmap resident
        del slab
        # slices below the next row's first real slice are final
        final = az.real_range(az.starts[row + 1])[0] if row + 1 < len(az.starts) else az.size
        final = max(final, acc_z0)
        if final > acc_z0:
            n = final - acc_z0
            block = acc[:n]
            block /= wsum_z[acc_z0:final, None, None]
            block /= wsum_yx[None]
            yield acc_z0, final, block
            carry = acc.shape[0] - n
            acc[:carry] = acc[n:] if n >= carry else acc[n:].copy()
            acc[carry:] = 0.0
            acc_z0 = final


def _prepare(restorer: Any, data: Any, tile: int, overlap: int, batch_size: int, window: str,
             progress: ProgressReporter) -> tuple[TilePlan, _TileRunner]:
    _check_params(tile, overlap, batch_size)
    if len(data.shape) != 3:
        raise CryowaeInputError(f"expected a 3D (Z, Y, X) volume, got shape "
                                f"{tuple(data.shape)}")
    model = restorer.model
    t = _resolve_tile(model, tile, overlap, progress)
    try:
        plan = plan_tiles(tuple(int(s) for s in data.shape), t, overlap,
                          _model_multiple(model), window)
    except ValueError as exc:
        raise CryowaeInputError(str(exc)) from None
    device = torch.device(getattr(restorer, "device", "cpu"))
    return plan, _TileRunner(model, device, batch_size, plan.tile_window(), progress)


def _check_out(out: Any, shape: tuple[int, ...]) -> None:
    if tuple(out.shape) != tuple(shape):
        raise CryowaeInputError(f"output array has shape {tuple(out.shape)}, expected "
                                f"{tuple(shape)}")


#: bytes written to a memory-mapped output between two flushes
_WRITE_CHUNK_BYTES = 2 << 20


def _write(out: Any, z0: int, z1: int, block: np.ndarray) -> None:
    """Write `block` to ``out[z0:z1]``; to a memory map a few slices at a time, each
    flushed and released (other arrays, e.g. zarr, get the block in one write)."""
    whole = z1 - z0
    step = max(1, _WRITE_CHUNK_BYTES // max(1, block[0].nbytes)) if _mmap_of(out) else whole
    for a in range(0, whole, step):
        part = block[a:a + step]
        if not np.isfinite(part).all():
            raise CryowaeInputError(
                f"the restorer produced NaN or infinite values in slices {z0 + a}-"
                f"{z0 + a + len(part) - 1}; the checkpoint may be corrupt (try --device "
                "cpu); no output was written")
        out[z0 + a:z0 + a + len(part)] = part
        release_pages(out, flush=True)


def _stats(data: Any, norm: tuple[float, float] | None) -> tuple[float, float]:
    from cryowae.io.stats import volume_stats

    if norm is not None:
        mean, std = float(norm[0]), float(norm[1])
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise CryowaeInputError(f"invalid normalisation (mean {mean}, std {std})")
        return mean, std
    return volume_stats(page_releasing(data))


def restore_array(restorer: Any, data: Any, tile: int = 96, overlap: int = 32,
                  batch_size: int = 4, window: str = "cosine",
                  progress: ProgressReporter | None = None, out: Any = None,
                  norm: tuple[float, float] | None = None) -> Any:
    """Restore a whole (Z, Y, X) tomogram tile by tile, in bounded memory.

    Parameters
    ----------
    restorer
        A `LoadedRestorer` (``.model``, ``.device``); the model maps (B, 1, Z, Y, X) to
        ``(restored, z)`` (or a tensor) for sizes that are multiples of ``model.multiple``.
    data
        (Z, Y, X) array-like: numpy array, memmap (e.g. ``read_volume(...).data``), zarr.
        Any real dtype; read one row of tiles at a time.
    tile, overlap
        Tile edge and minimum overlap of neighbouring tiles (voxels). The tile is rounded
        up to a multiple of ``model.multiple`` (reported through `progress`); axes
        shorter than a tile get one smaller tile and reflect padding.
    batch_size
        Tiles per forward pass; halved automatically on out-of-memory errors.
    window
        Blending window: ``cosine`` (default), ``gaussian`` or ``flat`` (no blending).
    progress
        Reporter: counts tiles, receives messages, and is polled for cancellation
        (`RestoreCancelled` is raised).
    out
        Optional writable (Z, Y, X) array (an MRC memmap from `open_mrc_writer`, a zarr
        array...) filled slab by slab and returned. Default: a new float32 array.
    norm
        (mean, std) to normalise with; default: ``volume_stats(data)``, the global
        normalisation used in training. The output is de-normalised with the same
        values, so it has the input's intensity scale.

    Returns
    -------
    The restored volume (float32), `out` itself when given.
    """
    progress = ensure_progress(progress)
    plan, runner = _prepare(restorer, data, tile, overlap, batch_size, window, progress)
    shape = plan.shape
    mean, std = _stats(data, norm)
    if out is None:
        out = np.zeros(shape, dtype=np.float32)
    _check_out(out, shape)
    progress.start(plan.n_tiles, "restoring")
    try:
        for z0, z1, block in _restore_slabs(runner, data, plan, (mean, std), progress):
            block *= std
            block += mean
            _write(out, z0, z1, block)
    finally:
        progress.finish()
    return out


def restore_halves(restorer: Any, even: Any, odd: Any, tile: int = 96, overlap: int = 32,
                   batch_size: int = 4, window: str = "cosine",
                   progress: ProgressReporter | None = None, out: Any = None,
                   norms: tuple[tuple[float, float], tuple[float, float]] | None = None,
                   out_norm: tuple[float, float] | None = None) -> Any:
    """Restore the even and odd half tomograms separately and average the two.

    Each half is normalised with its own global statistics (as in noise2noise training)
    and restored like `restore_array`; the two normalised restorations are averaged slab
    by slab and de-normalised with `out_norm` -- pass the full tomogram's (mean, std) to
    get its intensity scale -- or, by default, the mean of the halves' statistics.
    Memory stays bounded (two slab accumulators). Other parameters as `restore_array`.
    """
    progress = ensure_progress(progress)
    if tuple(even.shape) != tuple(odd.shape):
        raise CryowaeInputError(f"even and odd halves differ in shape: {tuple(even.shape)} "
                                f"vs {tuple(odd.shape)}")
    plan, runner = _prepare(restorer, even, tile, overlap, batch_size, window, progress)
    shape = plan.shape
    if norms is None:
        norms = (_stats(even, None), _stats(odd, None))
    else:
        norms = (_stats(even, norms[0]), _stats(odd, norms[1]))
    if out_norm is None:
        out_norm = ((norms[0][0] + norms[1][0]) / 2, (norms[0][1] + norms[1][1]) / 2)
    mean, std = _stats(even, out_norm)
    if out is None:
        out = np.zeros(shape, dtype=np.float32)
    _check_out(out, shape)
    progress.start(2 * plan.n_tiles, "restoring halves")
    try:
        slabs = zip(_restore_slabs(runner, even, plan, norms[0], progress),
                    _restore_slabs(runner, odd, plan, norms[1], progress), strict=True)
        for (z0, z1, a), (_, _, b) in slabs:
            a += b
            a *= 0.5 * std
            a += mean
            _write(out, z0, z1, a)
    finally:
        progress.finish()
    return out


# --------------------------------------------------------------------------- files

def _output_kind(out: Path) -> str:
    from cryowae.io import MRC_SUFFIXES

    suffix = out.suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in MRC_SUFFIXES:
        return "mrc"
    raise CryowaeInputError(f"{out}: output must end in .zarr (OME-Zarr) or "
                            f"{', '.join(MRC_SUFFIXES)} (MRC)")


def voxel_size_warning(voxel_size: float, training_voxel_size: float,
                       tolerance: float = VOXEL_SIZE_TOLERANCE) -> str | None:
    """The warning to show when a tomogram's voxel size is off the training data's."""
    if training_voxel_size <= 0:
        return None
    rel = abs(voxel_size - training_voxel_size) / training_voxel_size
    if rel <= tolerance:
        return None
    return (f"warning: voxel size {voxel_size:.1f} A differs from the training data's "
            f"{training_voxel_size:.1f} A by {100 * rel:.0f}%; restoration quality may "
            "suffer (bin the tomogram, or train on data at this voxel size)")


def _open_input(path: str | os.PathLike, what: str, check_nan: bool = True) -> Any:
    """`read_volume` (memory-mapped), with the NaN/Inf scan done slab by slab without
    leaving the whole file resident."""
    from cryowae.io import check_finite, read_volume

    vol = read_volume(path)
    if check_nan:
        check_finite(page_releasing(vol.data), name=f"{path}" if what == "tomogram"
                     else f"{path} ({what})")
    return vol


def restore_file(model: str | os.PathLike, tomogram: str | os.PathLike,
                 out: str | os.PathLike, even: str | os.PathLike | None = None,
                 odd: str | os.PathLike | None = None, tile: int = 96, overlap: int = 32,
                 batch_size: int = 4, device: str = "auto", overwrite: bool = False,
                 progress: ProgressReporter | None = None, window: str = "cosine",
                 halves: str = DEFAULT_HALVES_MODE) -> Path:
    """Restore a tomogram file with a trained model and write MRC or OME-Zarr.

    Parameters
    ----------
    model
        ``model.pt`` or a run directory holding one.
    tomogram
        MRC or OME-Zarr input, read memory-mapped and checked for NaN/Inf voxels.
    out
        Output path: ``.zarr`` writes OME-Zarr (3 pyramid levels), an MRC suffix
        (.mrc, .rec, ...) float32 MRC. Voxel size and origin are carried over. The
        output appears only when complete (atomic); an existing one is refused unless
        `overwrite`.
    even, odd
        Optional half tomograms (same shape). With ``halves="average"`` each half is
        restored and the two averaged, on the full tomogram's intensity scale; with
        ``"full"`` (the default, see `DEFAULT_HALVES_MODE` for the measurements) the
        full tomogram is restored in one pass and the halves' shapes are checked.
    tile, overlap, batch_size, window
        See `restore_array`.
    device
        ``auto``, ``cpu`` or ``cuda``.
    progress
        Reporter for tiles done and messages (e.g. a voxel-size mismatch warning).
    """
    from cryowae.io import check_output_path, create_ome_zarr, open_mrc_writer
    from cryowae.models.checkpoint import load_restorer

    progress = ensure_progress(progress)
    out = Path(out)
    kind = _output_kind(out)
    check_output_path(out, overwrite=overwrite)
    _check_params(tile, overlap, batch_size)
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    if halves not in HALVES_MODES:
        raise CryowaeInputError(f"unknown halves mode {halves!r} "
                                f"({', '.join(HALVES_MODES)})")
    restorer = load_restorer(model, resolve_device(device))
    vol = _open_input(tomogram, "tomogram")
    halves_data = None
    if even is not None and odd is not None:
        scan = halves == "average"  # with "full" the halves only need the right shape
        ev, od = _open_input(even, "even half", scan), _open_input(odd, "odd half", scan)
        for h, p in ((ev, even), (od, odd)):
            if h.shape != vol.shape:
                raise CryowaeInputError(f"{p}: shape {h.shape} differs from the tomogram's "
                                        f"{vol.shape}")
        halves_data = (ev.data, od.data)
    if halves_data is not None and halves == "full":
        progress.log("restoring the full tomogram in one pass (measured as good as averaging "
                     "the restored halves, at half the cost); --halves average restores "
                     "each half instead")
    warning = voxel_size_warning(vol.voxel_size, restorer.voxel_size)
    if warning:
        progress.log(warning)
    kw = dict(tile=tile, overlap=overlap, batch_size=batch_size, window=window,
              progress=progress)

    def run(target: Any) -> None:
        if halves_data is not None and halves == "average":
            restore_halves(restorer, *halves_data, out=target,
                           out_norm=_stats(vol.data, None), **kw)
        else:
            restore_array(restorer, vol.data, out=target, **kw)

    if kind == "zarr":
        with create_ome_zarr(out, vol.shape, vol.voxel_size, origin=vol.origin,
                             overwrite=overwrite) as writer:
            run(writer.level0)
    else:
        with open_mrc_writer(out, vol.shape, vol.voxel_size, origin=vol.origin,
                             meta=vol.meta, overwrite=overwrite) as target:
            run(target)
            release_pages(target, flush=True)
    return out


def throughput(shape: tuple[int, ...], seconds: float) -> float:
    """Output voxels per second."""
    return float(np.prod(shape)) / max(seconds, 1e-9)


__all__ = [
    "DEFAULT_HALVES_MODE", "HALVES_MODES", "RestoreCancelled", "page_releasing",
    "release_pages", "resolve_device", "restore_array", "restore_file", "restore_halves",
    "throughput", "voxel_size_warning",
]
