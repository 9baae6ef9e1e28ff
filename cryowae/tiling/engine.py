"""The one tile loop of cryowae: run a per-tile function over a volume, blend, stream out.

Restoration (`cryowae.inference.restore`), restore-batch blocks
(`cryowae.inference.batch.tasks`), training's wedge refill and posterior sampling all
run on `run_tiles`; only the per-tile function differs.

How it works. A (Z, Y, X) `source` (numpy array, `np.memmap`, zarr array; any real
dtype) is cut into the tiles of a `TilePlan` (`TileSettings.plan`). One row of tiles
along Z is handled at a time: its slab is read from `source`, each tile is normalised
with ``norm = (mean, std)`` (``(tile - mean) / std``, float32), the tiles go through
`fn` in batches of `batch_size` on `device` (halved on out-of-memory errors), each output
is multiplied by the plan's blending window and added into a buffer one tile thick.
Z-ranges that no later row touches are divided by the separable weight sum,
de-normalised (``* std + mean``) and handed to ``sink(where, block)``. Memory: one slab
of the input, the buffer and one batch of tiles, whatever the volume's depth.

Overlapped I/O (``prefetch``, on by default): a reader thread reads, cuts and normalises
the next batches of tiles (into pinned host memory for CUDA) while the device computes,
and a writer thread hands the finished block to the sink while the next row computes
(`cryowae.tiling.prefetch`); a few batches of tiles and one block more, same output bit
for bit. Running the batches (batch size, out-of-memory halving, the restoration's tile
function) is `cryowae.tiling.runner`.

The tile function. ``fn(x, refs)`` gets ``x``, a (B, 1, tz, ty, tx) float32 tensor of
normalised tiles on `device`, and ``refs``, one `TileRef` per tile, and returns a
(B, 1, tz, ty, tx) tensor (or a tuple whose first element is one) in normalised units.
It runs under `torch.inference_mode`. `model_tile_fn` gives the deterministic
restoration (``restorer.model(x)``). With ``channels=C`` it returns (B, C, tz, ty, tx).

For a sampler: ``ref.start`` is the tile's first voxel in the plan's *padded*
coordinates (real index = padded index - ``plan.axes[a].pad_before``; the padded grid
has the shape ``plan.padded_shape``). A quantity defined once on the padded grid, e.g.
one latent field per sample, is cropped identically by every tile that covers a voxel,
so overlapping tiles agree (tests/test_tiling.py checks this). A sketch, where
``draw_field`` and ``decode`` stand for the sampler's own prior draw and decoder call::

    plan = TileSettings(tile, overlap).plan(data.shape, model.multiple)
    tz, ty, tx = plan.tile
    field = draw_field(plan.padded_shape)                 # one per sample, on the device
    def fn(x, refs):
        crops = [field[..., z:z + tz, y:y + ty, w:w + tx] for z, y, w in
                 (r.start for r in refs)]
        return decode(x, torch.stack(crops))
    run_tiles(fn, data, plan, array_sink(out_s), norm=norm, device=device,
              batch_size=4, progress=progress, task="sampling")

A field at a coarser resolution (a network's bottleneck, ``multiple`` times coarser)
can be cropped the same way at ``start // multiple`` only where the starts are
multiples of it; `plan_tiles` does not align them, `cryowae.sampling.samplers.aligned_plan`
does. Several outputs per tile (``channels=C``: e.g. C samples decoded from one pass of
the encoder, `cryowae.sampling.family`) are blended channel by channel and reach the
sink as (C, z, Y, X) blocks.

``core=((z0, z1), (y0, y1), (x0, x1))`` restricts the work to the tiles of the *whole
volume's* plan that overlap the core and emits only the core: the result equals the
single pass over the whole volume there (restore-batch blocks rely on it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.tiling.pages import mmap_of, release_pages
from cryowae.tiling.plan import TilePlan, core_tiles
from cryowae.tiling.prefetch import BackgroundWriter, Prefetcher
from cryowae.tiling.runner import (
    Core,
    Range,
    TileFn,
    TileRef,
    TileRunner,
    is_out_of_memory,
    model_tile_fn,
)

Where = tuple[slice, slice, slice]
#: ``sink(where, block)``: `block` (float32, de-normalised) is the volume at the global
#: index `where` (three slices); the block is reused afterwards, so copy what you keep
Sink = Callable[[Where, np.ndarray], None]
#: batches of tiles the reader thread prepares ahead of the device (`run_tiles`)
DEFAULT_PREFETCH = 2


@dataclass
class _Batch:
    """One batch of normalised tiles of row `row` (an index into the rows worked on);
    `tiles` is (B, tz, ty, tx) float32, numpy or a pinned CPU tensor for CUDA."""

    row: int
    tiles: np.ndarray | torch.Tensor
    refs: list[TileRef]
    last: bool  # the row's last batch


def _tile_buffer(shape: tuple[int, ...], pin: bool) -> tuple[Any, np.ndarray]:
    """(buffer, numpy view): pinned host memory for fast copies to a CUDA device."""
    if pin:
        buf = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return buf, buf.numpy()
    arr = np.empty(shape, dtype=np.float32)
    return arr, arr


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


def _check_core(plan: TilePlan, core: Sequence[Range] | None) -> Core:
    if core is None:
        return tuple((0, a.size) for a in plan.axes)  # type: ignore[return-value]
    try:
        core_tiles(plan, core)
    except ValueError as exc:
        raise CryowaeInputError(f"core {tuple(core)}: {exc}") from None
    return tuple((int(c0), int(c1)) for c0, c1 in core)  # type: ignore[return-value]


def iter_slabs(runner: TileRunner, source: Any, plan: TilePlan, *,
               norm: tuple[float, float], progress: ProgressReporter | None = None,
               core: Sequence[Range] | None = None, task: str = "restoration",
               check_finite: bool = False,
               prefetch: int = 0) -> Iterator[tuple[Where, np.ndarray]]:
    """Yield ``(where, block)`` in increasing z: the blended result of real voxels `where`
    in *normalised* units (float32), covering the core (default: the whole volume).

    The block is a view of the internal buffer, valid until the next iteration; it is
    (C, z, Y, X) instead of (z, Y, X) for a runner of C > 1 ``channels``. Tiles
    are counted with ``progress.advance``; ``progress.check_cancelled(task)`` runs
    before every batch. With `check_finite`, each slab read is checked for NaN/Inf.
    With ``prefetch > 0`` the slabs are read, cut into tiles and normalised in a reader
    thread (`Prefetcher`) up to `prefetch` batches ahead of the device; the result is
    the same, bit for bit. See `run_tiles` for the other parameters.
    """
    progress = ensure_progress(progress)
    mean, std = float(norm[0]), float(norm[1])
    (cz0, cz1), (cy0, cy1), (cx0, cx1) = core = _check_core(plan, core)
    rows, cols_y, cols_x = core_tiles(plan, core)
    az, ay, ax = plan.axes
    wsum_z = az.weight_sum(plan.window).astype(np.float32)
    wsum_yx = np.outer(ay.weight_sum(plan.window), ax.weight_sum(plan.window)).astype(
        np.float32)[cy0:cy1, cx0:cx1]
    yx_tiles = [(iy, ix) for iy in cols_y for ix in cols_x]
    y_real = {iy: ay.real_indices(ay.starts[iy]) for iy in cols_y}
    x_real = {ix: ax.real_indices(ax.starts[ix]) for ix in cols_x}
    y_lo = min(int(i.min()) for i in y_real.values())
    y_hi = max(int(i.max()) for i in y_real.values()) + 1
    x_lo = min(int(i.min()) for i in x_real.values())
    x_hi = max(int(i.max()) for i in x_real.values()) + 1
    y_idx = {iy: _as_index(i - y_lo) for iy, i in y_real.items()}
    x_idx = {ix: _as_index(i - x_lo) for ix, i in x_real.items()}
    nch = runner.channels
    acc = np.zeros((nch, min(az.tile, cz1 - cz0), cy1 - cy0, cx1 - cx0), dtype=np.float32)
    acc_z0 = cz0  # real z of acc[0]; everything below it has been yielded
    batch = runner.batch
    pin = runner.device.type == "cuda" and torch.cuda.is_available()

    def batches() -> Iterator[_Batch]:  # the reading side (a thread with `prefetch`)
        for k_row, iz in enumerate(rows):
            zs = az.starts[iz]
            zi = az.real_indices(zs)
            z_lo, z_hi = int(zi.min()), int(zi.max()) + 1
            # a view for memory maps, a copy for zarr
            slab = np.asarray(source[z_lo:z_hi, y_lo:y_hi, x_lo:x_hi])
            if check_finite and not np.all(np.isfinite(slab)):
                raise CryowaeInputError(f"NaN or infinite voxels in slices {z_lo}-"
                                        f"{z_hi - 1} of the input")
            zi_rel = _as_index(zi - z_lo)
            for b0 in range(0, len(yx_tiles), batch):
                group = yx_tiles[b0:b0 + batch]
                buf, tiles = _tile_buffer((len(group), *plan.tile), pin)
                refs = []
                for k, (iy, ix) in enumerate(group):
                    tiles[k] = _take(slab, zi_rel, y_idx[iy], x_idx[ix])
                    ys, xs = ay.starts[iy], ax.starts[ix]
                    refs.append(TileRef((iz, iy, ix), (zs, ys, xs),
                                        (az.real_range(zs), ay.real_range(ys),
                                         ax.real_range(xs))))
                tiles -= mean
                tiles /= std
                release_pages(source)  # keeps only a few batches of a memmap resident
                yield _Batch(k_row, buf, refs, b0 + batch >= len(yx_tiles))
            del slab

    items = Prefetcher(batches, prefetch) if prefetch > 0 else batches()
    with closing(items):
        for item in items:
            progress.check_cancelled(task)
            zs = az.starts[rows[item.row]]
            rz0, rz1 = az.real_range(zs)
            rz0, rz1 = max(rz0, cz0), min(rz1, cz1)
            if rz1 - acc_z0 > acc.shape[1]:  # (only when tiles shrink the padding; rare)
                grown = np.zeros((nch, rz1 - acc_z0, *acc.shape[2:]), dtype=np.float32)
                grown[:, :acc.shape[1]] = acc
                acc = grown
            outs = runner(item.tiles, item.refs).reshape(len(item.refs), nch, *plan.tile)
            for k, ref in enumerate(item.refs):
                (_, _), (ry0, ry1), (rx0, rx1) = ref.real
                ry0, ry1, rx0, rx1 = max(ry0, cy0), min(ry1, cy1), max(rx0, cx0), min(rx1, cx1)
                oz, oy, ox = (rz0 - (zs - az.pad_before), ry0 - (ref.start[1] - ay.pad_before),
                              rx0 - (ref.start[2] - ax.pad_before))
                acc[:, rz0 - acc_z0:rz1 - acc_z0, ry0 - cy0:ry1 - cy0,
                    rx0 - cx0:rx1 - cx0] += outs[k, :, oz:oz + rz1 - rz0,
                                                 oy:oy + ry1 - ry0, ox:ox + rx1 - rx0]
            progress.advance(len(item.refs))
            if not item.last:
                continue
            # slices below the next row's first real slice are final
            k_row = item.row
            final = (min(az.real_range(az.starts[rows[k_row + 1]])[0], cz1)
                     if k_row + 1 < len(rows) else cz1)
            final = max(final, acc_z0)
            if final > acc_z0:
                n = final - acc_z0
                block = acc[:, :n]
                block /= wsum_z[acc_z0:final, None, None]
                block /= wsum_yx[None]
                yield ((slice(acc_z0, final), slice(cy0, cy1), slice(cx0, cx1)),
                       block[0] if nch == 1 else block)
                carry = acc.shape[1] - n
                acc[:, :carry] = acc[:, n:] if n >= carry else acc[:, n:].copy()
                acc[:, carry:] = 0.0
                acc_z0 = final


def run_tiles(fn: TileFn, source: Any, plan: TilePlan, sink: Sink, *,
              norm: tuple[float, float], device: torch.device | str, batch_size: int,
              progress: ProgressReporter | None = None, core: Sequence[Range] | None = None,
              task: str = "restoration", check_finite: bool = False,
              channels: int = 1, prefetch: int = DEFAULT_PREFETCH) -> None:
    """Run `fn` over every tile of `plan` on `source`, blend, and stream the result out.

    Parameters
    ----------
    fn
        The `TileFn` (see the module docstring; `model_tile_fn` for restoration).
    source
        (Z, Y, X) array-like of the plan's shape: numpy, memmap, zarr; any real dtype.
        Only the slab of one row of tiles is read at a time.
    plan
        The tile plan of the *whole* volume (`TileSettings.plan`).
    sink
        ``sink(where, block)`` receives the finished, de-normalised float32 blocks in
        increasing z; `array_sink` writes them into an array.
    norm
        (mean, std): tiles are normalised with it and the output de-normalised with it.
    device, batch_size
        Where `fn` runs and how many tiles it gets at a time.
    progress
        Counts tiles (the caller calls ``start``/``finish``); polled for cancellation
        (`cryowae.progress.Cancelled` is raised, naming `task`).
    core
        ((z0, z1), (y0, y1), (x0, x1)): restore only these voxels (the tiles of the
        whole plan that overlap them), exactly as the whole pass would.
    check_finite
        Refuse NaN/Inf input voxels (`CryowaeInputError`) as the slabs are read.
    channels
        C: outputs per tile. With C > 1, `fn` returns (B, C, tz, ty, tx) (e.g. C
        samples decoded from one pass of a network's encoder), each channel is blended
        on its own, and `sink` receives (C, z, Y, X) blocks. The slab buffer is C times
        larger.
    prefetch
        Overlapped I/O: a reader thread prepares up to `prefetch` batches of tiles
        ahead of the device (pinned host memory for CUDA), and a writer thread runs
        `sink` on a copy of each finished block while the next row computes (one block
        in flight). The output is bit-identical to ``prefetch=0`` (everything in the
        calling thread); memory grows by those batches and one block.
    """
    mean, std = float(norm[0]), float(norm[1])
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise CryowaeInputError(f"invalid normalisation (mean {mean}, std {std})")
    if tuple(int(s) for s in source.shape) != plan.shape:
        raise CryowaeInputError(f"input of shape {tuple(source.shape)} does not match the "
                                f"tile plan's {plan.shape}")
    runner = TileRunner(fn, plan, device, batch_size, progress, channels)
    writer = BackgroundWriter(sink) if prefetch > 0 else None
    slabs = iter_slabs(runner, source, plan, norm=(mean, std), progress=progress,
                       core=core, task=task, check_finite=check_finite, prefetch=prefetch)
    try:
        with closing(slabs):
            for where, block in slabs:
                if writer is None:
                    block *= std
                    block += mean
                    sink(where, block)
                    continue
                writer.wait()  # one block in flight: memory stays bounded
                out = block * std  # float32, as the in-place product
                out += mean
                writer.submit(where, out)
    except BaseException:
        if writer is not None:
            writer.close(raise_errors=False)  # finish what was computed, keep the error
        raise
    if writer is not None:
        writer.close()


#: bytes written to a memory-mapped output between two flushes
_WRITE_CHUNK_BYTES = 2 << 20


def array_sink(out: Any, origin: Sequence[int] = (0, 0, 0)) -> Sink:
    """A `Sink` writing each block into `out` (numpy, memmap, zarr) at ``where - origin``.

    Blocks with NaN or infinite values are refused (`CryowaeInputError`: the restorer
    produced them). A memory-mapped `out` gets a few slices at a time, each flushed and
    released from the resident memory; other arrays (zarr) get each block in one write.
    """
    oz, oy, ox = (int(o) for o in origin)

    def write(where: Where, block: np.ndarray) -> None:
        z0, z1 = where[0].start, where[0].stop
        ys = slice(where[1].start - oy, where[1].stop - oy)
        xs = slice(where[2].start - ox, where[2].stop - ox)
        whole = z1 - z0
        step = (max(1, _WRITE_CHUNK_BYTES // max(1, block[0].nbytes)) if mmap_of(out)
                else whole)
        for a in range(0, whole, step):
            part = block[a:a + step]
            if not np.isfinite(part).all():
                raise CryowaeInputError(
                    f"the restorer produced NaN or infinite values in slices {z0 + a}-"
                    f"{z0 + a + len(part) - 1}; the checkpoint may be corrupt (try "
                    "--device cpu)")
            out[z0 + a - oz:z0 + a + len(part) - oz, ys, xs] = part
            release_pages(out, flush=True)

    return write


__all__ = [
    "DEFAULT_PREFETCH", "Core", "Sink", "TileFn", "TileRef", "TileRunner", "array_sink",
    "is_out_of_memory", "iter_slabs", "model_tile_fn", "run_tiles",
]
