"""Restore whole tomograms with a trained restorer: tiled, blended, bounded in memory.

The tomogram is normalised with its global mean and standard deviation (as in training)
and restored by the tile engine (`cryowae.tiling.engine.run_tiles` with
`model_tile_fn`): overlapping tiles go through the network in batches and are blended
with a window that vanishes towards the tile edges, so no grid of seams appears. Memory
does not grow with the tomogram's thickness: one row of tiles along Z is processed at a
time, and pages of memory-mapped inputs and outputs are handed back to the kernel as the
work moves on, so the resident size of the process stays near one slab (tile x Y x X
float32) plus the network's working set for one batch of tiles (which dominates: ~0.9 GB
for two 96^3 tiles through a channels=12 restorer on the CPU; see
benchmarks/bench_restore.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.devices import resolve_device
from cryowae.errors import CryowaeInputError
from cryowae.io.volume import Volume
from cryowae.models.protocol import Restorer
from cryowae.physics.geometry import TiltGeometry, find_tilt_file, geometry_mismatch
from cryowae.physics.wedge_estimate import spectrum_warning
from cryowae.precision import ComputeSettings
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.tiling.engine import (
    DEFAULT_PREFETCH,
    TileRunner,
    array_sink,
    iter_slabs,
    model_tile_fn,
    run_tiles,
)
from cryowae.tiling.pages import page_releasing, release_pages
from cryowae.tiling.plan import TilePlan
from cryowae.tiling.runner import resolve_batch_size
from cryowae.tiling.settings import TileSettings

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


# --------------------------------------------------------------------------- arrays

def _plan(restorer: Restorer, data: Any, settings: TileSettings,
          progress: ProgressReporter) -> TilePlan:
    """The plan of `data` for the restorer's size multiple (the rounding is reported)."""
    multiple = int(getattr(restorer.model, "multiple", 1) or 1)
    note = settings.rounding_note(multiple)
    if note:
        progress.log(note)
    return settings.plan(data.shape, multiple)


def _stats(data: Any, norm: tuple[float, float] | None) -> tuple[float, float]:
    from cryowae.io.stats import volume_stats

    if norm is not None:
        mean, std = float(norm[0]), float(norm[1])
        if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
            raise CryowaeInputError(f"invalid normalisation (mean {mean}, std {std})")
        return mean, std
    return volume_stats(page_releasing(data))


def _output(out: Any, shape: tuple[int, int, int]) -> Any:
    if out is None:
        return np.zeros(shape, dtype=np.float32)
    if tuple(out.shape) != tuple(shape):
        raise CryowaeInputError(f"output array has shape {tuple(out.shape)}, expected "
                                f"{tuple(shape)}")
    return out


def _settings(tile: int, overlap: int, batch_size: int | None,
              window: str) -> tuple[TileSettings, int | None]:
    """The tile settings and the batch size asked for (None: chosen by `_batch`)."""
    return (TileSettings(tile, overlap, 4 if batch_size is None else batch_size, window),
            batch_size)


def _batch(fn: Any, plan: TilePlan, restorer: Restorer, requested: int | None,
           progress: ProgressReporter) -> int:
    """`requested`, else from the free GPU memory (`resolve_batch_size`), else 4."""
    return resolve_batch_size(fn, plan.tile, restorer.device, requested, progress.log)


def _restore(restorer: Restorer, data: Any, settings: TileSettings,
             progress: ProgressReporter, out: Any, norm: tuple[float, float] | None,
             compute: ComputeSettings | None = None, auto_batch: bool = False) -> Any:
    plan = _plan(restorer, data, settings, progress)
    norm = _stats(data, norm)
    out = _output(out, plan.shape)
    fn = model_tile_fn(restorer, compute, progress.log)
    batch = _batch(fn, plan, restorer, None if auto_batch else settings.batch_size, progress)
    progress.start(plan.n_tiles, "restoring")
    try:
        run_tiles(fn, data, plan, array_sink(out), norm=norm, device=restorer.device,
                  batch_size=batch, progress=progress)
    finally:
        progress.finish()
    return out


def restore_array(restorer: Restorer, data: Any, tile: int = 96, overlap: int = 32,
                  batch_size: int | None = 4, window: str = "cosine",
                  progress: ProgressReporter | None = None, out: Any = None,
                  norm: tuple[float, float] | None = None,
                  compute: ComputeSettings | None = None) -> Any:
    """Restore a whole (Z, Y, X) tomogram tile by tile, in bounded memory.

    Parameters
    ----------
    restorer
        A `Restorer` (``.model``, ``.device``), e.g. a `LoadedRestorer`; the model maps
        (B, 1, Z, Y, X) to ``(restored, z)`` (or a tensor) for sizes that are multiples
        of ``model.multiple``.
    data
        (Z, Y, X) array-like: numpy array, memmap (e.g. ``read_volume(...).data``), zarr.
        Any real dtype; read one row of tiles at a time.
    tile, overlap, batch_size, window
        `TileSettings`: tile edge and minimum overlap of neighbouring tiles (voxels; the
        tile is rounded up to a multiple of ``model.multiple``, reported through
        `progress`; axes shorter than a tile get one smaller tile and reflect padding),
        tiles per forward pass (halved automatically on out-of-memory errors), blending
        window (``cosine``, ``gaussian`` or ``flat``). ``batch_size=None``: chosen
        from the free GPU memory on CUDA (`cryowae.tiling.runner.batch_for_memory`),
        4 elsewhere.
    progress
        Reporter: counts tiles, receives messages, and is polled for cancellation
        (`cryowae.progress.Cancelled` is raised).
    out
        Optional writable (Z, Y, X) array (an MRC memmap from `open_mrc_writer`, a zarr
        array...) filled slab by slab and returned. Default: a new float32 array.
    norm
        (mean, std) to normalise with; default: ``volume_stats(data)``, the global
        normalisation used in training. The output is de-normalised with the same
        values, so it has the input's intensity scale.
    compute
        bf16 autocast (`cryowae.precision.amp_active`: on CUDA by default, on a CPU
        with bf16 instructions when asked for), ``channels_last_3d``, `torch.compile`
        (`cryowae.precision.ComputeSettings`).

    Returns
    -------
    The restored volume (float32), `out` itself when given.
    """
    settings, asked = _settings(tile, overlap, batch_size, window)
    return _restore(restorer, data, settings, ensure_progress(progress), out, norm,
                    compute, asked is None)


def _restore_halves(restorer: Restorer, even: Any, odd: Any, settings: TileSettings,
                    progress: ProgressReporter, out: Any,
                    norms: tuple[tuple[float, float], tuple[float, float]] | None,
                    out_norm: tuple[float, float] | None,
                    compute: ComputeSettings | None = None, auto_batch: bool = False) -> Any:
    if tuple(even.shape) != tuple(odd.shape):
        raise CryowaeInputError(f"even and odd halves differ in shape: {tuple(even.shape)} "
                                f"vs {tuple(odd.shape)}")
    plan = _plan(restorer, even, settings, progress)
    if norms is None:
        norms = (_stats(even, None), _stats(odd, None))
    else:
        norms = (_stats(even, norms[0]), _stats(odd, norms[1]))
    if out_norm is None:
        out_norm = ((norms[0][0] + norms[1][0]) / 2, (norms[0][1] + norms[1][1]) / 2)
    mean, std = _stats(even, out_norm)
    out = _output(out, plan.shape)
    sink = array_sink(out)
    # one runner: an out-of-memory fallback holds for both halves
    fn = model_tile_fn(restorer, compute, progress.log)
    runner = TileRunner(fn, plan, restorer.device, _batch(
        fn, plan, restorer, None if auto_batch else settings.batch_size, progress), progress)
    progress.start(2 * plan.n_tiles, "restoring halves")
    try:
        slabs = zip(iter_slabs(runner, even, plan, norm=norms[0], progress=progress,
                               prefetch=DEFAULT_PREFETCH),
                    iter_slabs(runner, odd, plan, norm=norms[1], progress=progress,
                               prefetch=DEFAULT_PREFETCH), strict=True)
        for (where, a), (_, b) in slabs:
            a += b
            a *= 0.5 * std
            a += mean
            sink(where, a)
    finally:
        progress.finish()
    return out


def restore_halves(restorer: Restorer, even: Any, odd: Any, tile: int = 96,
                   overlap: int = 32, batch_size: int = 4, window: str = "cosine",
                   progress: ProgressReporter | None = None, out: Any = None,
                   norms: tuple[tuple[float, float], tuple[float, float]] | None = None,
                   out_norm: tuple[float, float] | None = None) -> Any:
    """Restore the even and odd half tomograms separately and average the two.

    Each half is normalised with its own global statistics (as in noise2noise training)
    and restored like `restore_array`; the two normalised restorations are averaged slab
    by slab and de-normalised with `out_norm` -- pass the full tomogram's (mean, std) to
    get its intensity scale -- or, by default, the mean of the halves' statistics.
    Memory stays bounded (two slab buffers). Other parameters as `restore_array`.
    """
    settings = TileSettings(tile, overlap, batch_size, window)
    return _restore_halves(restorer, even, odd, settings, ensure_progress(progress), out,
                           norms, out_norm)


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


def _open_input(path: str | os.PathLike, what: str, check_nan: bool = True) -> Volume:
    """`read_volume` (memory-mapped), with the NaN/Inf scan done slab by slab without
    leaving the whole file resident. Close the returned volume (a context manager)."""
    from cryowae.io import check_finite, read_volume

    vol = read_volume(path)
    if check_nan:
        try:
            check_finite(page_releasing(vol.data), name=f"{path}" if what == "tomogram"
                         else f"{path} ({what})")
        except BaseException:
            vol.close()
            raise
    return vol


def restore_file(model: str | os.PathLike, tomogram: str | os.PathLike,
                 out: str | os.PathLike, even: str | os.PathLike | None = None,
                 odd: str | os.PathLike | None = None, tile: int = 96, overlap: int = 32,
                 batch_size: int | None = 4, device: str = "auto", overwrite: bool = False,
                 progress: ProgressReporter | None = None, window: str = "cosine",
                 halves: str = DEFAULT_HALVES_MODE,
                 geometry: TiltGeometry | None = None,
                 compute: ComputeSettings | None = None) -> Path:
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
    tile, overlap, batch_size, window, compute
        See `restore_array` (``batch_size=None``: from the free GPU memory).
    device
        ``auto``, ``cpu`` or ``cuda``.
    progress
        Reporter for tiles done and messages (e.g. a voxel-size mismatch warning).
    geometry
        The tomogram's tilt geometry, when known (default: a .tlt/.rawtlt file next to
        the tomogram, if there is one). Restoration does not need it; a geometry other
        than the model's training geometry is reported (`geometry_mismatch`), and so is
        one (or, when none is known, the model's) that the tomogram's own spectrum
        contradicts (`spectrum_warning`).
    """
    from cryowae.io import check_output_path, create_ome_zarr, open_mrc_writer
    from cryowae.models.checkpoint import load_restorer

    progress = ensure_progress(progress)
    out = Path(out)
    kind = _output_kind(out)
    check_output_path(out, overwrite=overwrite)
    settings, asked = _settings(tile, overlap, batch_size, window)
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    if halves not in HALVES_MODES:
        raise CryowaeInputError(f"unknown halves mode {halves!r} "
                                f"({', '.join(HALVES_MODES)})")
    restorer = load_restorer(model, resolve_device(device))
    with contextlib.ExitStack() as files:
        vol = files.enter_context(_open_input(tomogram, "tomogram"))
        halves_data = None
        if even is not None and odd is not None:
            scan = halves == "average"  # with "full" the halves only need the right shape
            ev = files.enter_context(_open_input(even, "even half", scan))
            od = files.enter_context(_open_input(odd, "odd half", scan))
            for h, p in ((ev, even), (od, odd)):
                if h.shape != vol.shape:
                    raise CryowaeInputError(f"{p}: shape {h.shape} differs from the "
                                            f"tomogram's {vol.shape}")
            halves_data = (ev.data, od.data)
        if halves_data is not None and halves == "full":
            progress.log("restoring the full tomogram in one pass (measured as good as "
                         "averaging the restored halves, at half the cost); --halves "
                         "average restores each half instead")
        warning = voxel_size_warning(vol.voxel_size, restorer.voxel_size)
        if warning:
            progress.log(warning)
        found = find_tilt_file(tomogram) if geometry is None else None
        if found is not None:
            geometry = TiltGeometry.from_file(found, restorer.geometry.axis)
        if geometry is not None:
            mismatch = geometry_mismatch(geometry, restorer.geometry)
            if mismatch:
                progress.log(mismatch)
        seen = spectrum_warning(vol.data, geometry or restorer.geometry, Path(tomogram).name)
        if seen:
            progress.log(seen)

        def run(target: Any) -> None:
            if halves_data is not None and halves == "average":
                _restore_halves(restorer, *halves_data, settings, progress, target, None,
                                _stats(vol.data, None), compute, asked is None)
            else:
                _restore(restorer, vol.data, settings, progress, target, None, compute,
                         asked is None)

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
    "DEFAULT_HALVES_MODE", "HALVES_MODES", "VOXEL_SIZE_TOLERANCE", "restore_array",
    "restore_file", "restore_halves", "throughput", "voxel_size_warning",
]
