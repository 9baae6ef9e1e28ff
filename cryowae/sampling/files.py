"""`sample_file`: a posterior family of a tomogram file, streamed to disk, resumable.

Output directory (appears complete, by one rename, or not at all):

    OUT/samples.zarr   OME-Zarr, axes (s, z, y, x): the first K of the N samples
                       (`StorageSettings.keep`, default all), float16 by default, one
                       sample x 4 slices x 256 x 256 voxels per chunk, Blosc zstd
    OUT/mean.mrc       per-voxel mean of all N float32 samples (float32)
    OUT/std.mrc        per-voxel standard deviation of all N (ddof = 0; float16)
    OUT/family.json    parameters, the consistency check per shell, the spread, the
                       spread calibration (`cryowae.sampling.recalibrate`), the local
                       spread step and the self-check (`cryowae.sampling.selfcheck`)

Every figure comes from the N float32 samples: they stream into samples.zarr itself
when it is float32 and keeps all N, otherwise into a float32 working store
(``work.zarr``). In that store, in this order: the per-shell calibration, the local
spread step (`cryowae.sampling.store_local_spread`, unless turned off), mean.mrc and
std.mrc, the self-check on a central crop; then the first K are copied into
samples.zarr.

Work is shared between the steps: the family's centre (the mean path's restoration,
``centre.npy``) streams out of the first group's sampling pass, whose tiles run the mean
path anyway (`cryowae.sampling.family_store`; restored on its own where that pass tiles
the tomogram otherwise), and the crops the calibration, the local step and the
self-check restore go through one `SharedRestoration`, so that a crop restored by one
step is not restored again by another.

While it runs, the work lives in ``.OUT.partial/`` beside OUT: the stores and
``state.json`` (the run's fingerprint and the finished samples, rewritten atomically
after each group). A rerun with the same model, tomogram and settings continues from
the finished samples and, since sample s depends only on (seed, s), gives the same
family as an uninterrupted run; a rerun with other settings starts over (and says so).

Memory: the tomogram and the halves are memory-mapped and read slab by slab (the tile
engine), each sample streams into the zarr store, the spread calibration estimates its
factors on a central crop and filters each sample tile by tile in place, the mean and std
are computed from the store block by block into memory-mapped MRC files, and the check
reads a central crop; the local step keeps a few float32 maps of the tomogram's size
memory-mapped in the partial folder. Disk: N float32 samples while it runs (the
working store).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any

import zarr
from numcodecs import Blosc

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path, check_output_path
from cryowae.io.omezarr import OmeZarrWriter
from cryowae.physics.crop import central_box, crop_of
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge_estimate import spectrum_warning
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.sampling.consistency import CHECK_EDGE
from cryowae.sampling.family import MOMENT_BLOCK, plan_family, run_family
from cryowae.sampling.family_state import FamilyRun, fingerprint, write_json
from cryowae.sampling.family_store import (
    CENTRE,
    SampleView,
    centre_from_pass,
    export_samples,
    pass_gives_centre,
    restored_centre,
    write_moments,
)
from cryowae.sampling.local_spread import LocalSpreadSettings
from cryowae.sampling.recalibrate import resolve_mode
from cryowae.sampling.restorations import SharedRestoration
from cryowae.sampling.selfcheck import self_check
from cryowae.sampling.settings import (
    FLOAT16_TOLERANCE,
    CalibrationSettings,
    SamplerSettings,
    StorageSettings,
    float16_fits,
)
from cryowae.sampling.store_calibration import calibrate_store
from cryowae.sampling.store_local_spread import localise_store
from cryowae.tiling.engine import array_sink
from cryowae.tiling.pages import page_releasing

#: zstd level of samples.zarr's chunks (Blosc, bit-shuffled: the sign and exponent bits
#: of neighbouring float16 values are alike and compress; the low mantissa bits do not);
#: level 1: higher levels hold megabytes more working memory per chunk and compress noisy
#: tomograms barely better, and sampling keeps to a fixed memory bound
ZSTD_LEVEL = 1
def _pyramid_levels(shape: tuple[int, ...], max_levels: int = 3, min_size: int = 16) -> int:
    levels = 1
    while levels < max_levels and min(shape) // 2**levels >= min_size:
        levels += 1
    return levels


def _open(path: str | os.PathLike, what: str, stack: contextlib.ExitStack) -> Any:
    from cryowae.io import check_finite, read_volume

    vol = stack.enter_context(read_volume(path))
    check_finite(page_releasing(vol.data), name=f"{path} ({what})")
    return vol


def _load(model: Any, device: str) -> Any:
    if not isinstance(model, str | os.PathLike):
        return model  # an already loaded `Restorer`
    from cryowae.devices import resolve_device
    from cryowae.models.checkpoint import load_restorer

    return load_restorer(model, resolve_device(device))


def sample_file(model: Any, tomogram: str | os.PathLike, out_dir: str | os.PathLike,
                sampling: SamplerSettings | None = None,
                calibration: CalibrationSettings | None = None,
                storage: StorageSettings | None = None,
                local: LocalSpreadSettings | None = None, *,
                even: str | os.PathLike | None = None,
                odd: str | os.PathLike | None = None,
                geometry: TiltGeometry | None = None, device: str = "auto",
                progress: ProgressReporter | None = None) -> Path:
    """Sample a family of a tomogram file into `out_dir` (module docstring).

    Parameters
    ----------
    model
        ``model.pt`` (or its run directory), an already loaded `LoadedRestorer`, or a
        list of either for ``sampler="ensemble"``.
    tomogram, even, odd
        MRC or OME-Zarr files (memory-mapped); the halves serve the noise power of the
        consistency check and the ``halves`` spread calibration.
    sampling
        Family size, sampler, tiles, seed (`SamplerSettings`).
    calibration
        Spread calibration and consistency check (`CalibrationSettings`): the per-shell
        widening of the finished samples about their mean before the moments are
        written (`cryowae.sampling.store_calibration.calibrate_store`), recorded in
        ``family.json`` under ``spread_calibration``.
    storage
        Sample dtype, samples kept, codec, chunks, pyramid, std dtype, overwrite
        (`StorageSettings`).
    local
        The local spread step (`LocalSpreadSettings`; on unless ``enabled=False``):
        after the calibration, every float32 sample's deviation from the family mean
        is modulated by g(x) (`cryowae.sampling.store_local_spread.localise_store`),
        before the moments and the export; recorded under ``local_spread``. The
        self-check (`cryowae.sampling.selfcheck.self_check`) always runs on the
        finished float32 family; ``family.json`` holds it under ``self_check``.
    geometry
        Tilt geometry; default: the model's (resolve options with `TiltGeometry.resolve`).
        One the tomogram's own spectrum contradicts is reported (`spectrum_warning`).
    """
    from cryowae.inference.restore import voxel_size_warning
    from cryowae.io.stats import volume_stats

    sampling = sampling or SamplerSettings()
    calibration = calibration or CalibrationSettings()
    storage = storage or StorageSettings()
    local = local or LocalSpreadSettings()
    prog = ensure_progress(progress)
    out = check_output_path(out_dir, storage.overwrite)
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    spread = calibration.spread
    resolve_mode(spread, even is not None)
    many = isinstance(model, list | tuple)
    restorers = [_load(m, device) for m in (model if many else [model])]
    settings = sampling.tiles
    partial = out.with_name(f".{out.name}.partial")
    with contextlib.ExitStack() as stack:
        vol = _open(tomogram, "tomogram", stack)
        halves = [_open(h, f"{k} half", stack).data if h is not None else None
                  for k, h in (("even", even), ("odd", odd))]
        for h, p in zip(halves, (even, odd), strict=True):
            if h is not None and tuple(h.shape) != vol.shape:
                raise CryowaeInputError(f"{p}: shape {tuple(h.shape)} differs from the "
                                        f"tomogram's {vol.shape}")
        warning = voxel_size_warning(vol.voxel_size, restorers[0].voxel_size)
        if warning:
            prog.log(warning)
        seen = spectrum_warning(vol.data, geometry or restorers[0].geometry,
                                Path(tomogram).name)
        if seen:
            prog.log(seen)
        fp = plan_family(restorers if many else restorers[0], vol.shape, sampling,
                         geometry)
        keep = storage.kept(fp.n_samples)
        norm = volume_stats(page_releasing(vol.data))
        dtype = storage.sample_dtype
        if dtype == "float16" and not float16_fits(norm):
            prog.log(f"samples stored as float32: float16 would round the tomogram's "
                     f"values (mean {norm[0]:.4g}, std {norm[1]:.4g}) by more than "
                     f"{FLOAT16_TOLERANCE:g} of its std")
            dtype = "float32"
        # float32 and every sample kept: the samples are calibrated where they are
        # stored; otherwise in a float32 working store that holds all N
        direct = dtype == "float32" and keep == fp.n_samples
        params = fp.describe() | {"seed": sampling.seed, "overlap": settings.overlap,
                                  "spread_calibration": spread,
                                  "local_spread": local.describe(),
                                  "norm": list(norm), "models": [str(getattr(r, "path", ""))
                                                                 for r in restorers]}
        params |= {"storage": storage.describe() | {"sample_dtype": dtype,
                                                    "samples_stored": keep}}
        paths = [Path(p) for p in (tomogram, even, odd) if p is not None]
        paths += [Path(getattr(r, "path", "")) for r in restorers if getattr(r, "path", "")]
        run = FamilyRun(partial, fingerprint(paths, params), fp.n_samples, prog)
        shape = vol.shape
        # NGFF 0.4 stores are zarr format 2: the codec is numcodecs' Blosc
        codec = Blosc("zstd", ZSTD_LEVEL, Blosc.BITSHUFFLE) \
            if storage.compression == "zstd" else None
        writer = OmeZarrWriter(partial / "samples.zarr", (keep, *shape), vol.voxel_size,
                               _pyramid_levels(shape) if storage.pyramid else 1,
                               storage.chunks(shape), ("s",), vol.origin,
                               {"cryowae": {"kind": "posterior-family",
                                            "version": __version__, "sampler": fp.sampler}},
                               dtype=dtype, compressor=codec)
        work = writer.level0 if direct else zarr.open_array(
            str(partial / "work.zarr"), mode="a", shape=(fp.n_samples, *shape),
            chunks=(1, *(min(MOMENT_BLOCK, s) for s in shape)), dtype="float32",
            fill_value=0.0, zarr_format=2, compressor=None)

        t0 = time.perf_counter()
        stochastic = getattr(restorers[0], "stochastic", None) if fp.sampler == "prior" \
            else None
        localise = local.enabled and fp.n_samples > 1
        calibrating = stochastic is not None and spread != "none"
        todo = run.todo()
        # the centre (the mean path's restoration) from the first group's pass, which
        # runs the mean path on every tile anyway, where that gives it bit for bit
        from_pass = ((calibrating or localise) and bool(todo)
                     and not run.calibration.get("centre_ready")
                     and pass_gives_centre(fp, restorers[0], settings, sampling.amp))
        run_family(fp, vol.data, norm, lambda s: array_sink(SampleView(work, s)), todo,
                   prog, run.finished,
                   centre=centre_from_pass(partial, shape, run) if from_pass else None)
        if spread != "none":
            prog.log(f"spread calibration ({resolve_mode(spread, even is not None)})"
                     f": per-shell factors, then {fp.n_samples} samples filtered")
        from cryowae.inference.restore import restore_array

        # the centre's restoration as a function of an array (same tiles and
        # normalisation as the centre): what the calibration's SURE differentiates and
        # the self-check restores; the SURE's central crop, restored by both, once
        restore = SharedRestoration(functools.partial(
            restore_array, restorers[0], tile=settings.tile, overlap=settings.overlap,
            batch_size=settings.batch_size, norm=norm),
            keep=[crop_of(vol.data, central_box(shape, CHECK_EDGE, even=True)).numpy()])
        centre = restored_centre(restorers[0], vol.data, norm, settings, partial, run,
                                 prog) if calibrating or localise else None
        # page-releasing views: the wedge ratio scans the whole tomogram (statistics,
        # structure map), which would otherwise leave its pages resident
        data = page_releasing(vol.data)
        calibrated = calibrate_store(work, data, fp.geometry, spread,
                                     run.calibration, run.save, partial,
                                     *(None if h is None else page_releasing(h)
                                       for h in halves),
                                     model=stochastic, centre=centre if calibrating else None,
                                     restore=restore if calibrating else None)
        # the local step on all N float32 samples, before their moments and the export
        localised = {"settings": local.describe()}
        if localise:
            prog.log(f"local spread: the family's std set by the centre's measured power, "
                     f"{fp.n_samples} samples modulated")
            localised = localise_store(work, centre, fp.geometry, run.local, run.save,
                                       partial, local)
        del centre
        figures = run.output.get("figures")
        if figures is None:  # mean.mrc and std.mrc are complete once figures are saved
            figures = write_moments(partial, work, vol, fp.geometry, norm,
                                    calibration.consistency, halves, storage.std_dtype)
            run.output["figures"] = figures
            run.save()
        checked = run.output.get("self_check")
        if checked is None:  # on the N float32 samples as stored, before the export
            prog.log("self-check: the family's spread against the data's own error "
                     "estimates (central crop)")
            checked = self_check(work, data, fp.geometry, restore, settings=local)
            run.output["self_check"] = checked
            run.save()
        if not direct:
            export_samples(work, partial / "work.zarr", writer.level0, keep, run)
        per_slice = 2 * keep * shape[1] * shape[2] * 4  # pyramid: ~8 MiB slabs
        writer.finish(slab=max(1, min(32, (8 << 20) // max(1, per_slice))))
        meta = {"cryowae_version": __version__, "kind": "posterior-family",
                "tomogram": str(tomogram), "even": str(even) if even else None,
                "odd": str(odd) if odd else None, "voxel_size": vol.voxel_size,
                "origin": list(vol.origin), "std_ddof": 0, "shape": list(shape),
                "files": {"samples": "samples.zarr", "mean": "mean.mrc", "std": "std.mrc"},
                "parameters": params | {"tile_setting": settings.tile,
                                        "batch_size": settings.batch_size,
                                        "device": str(fp.device),
                                        "consistency": calibration.consistency},
                "sampling_seconds_this_run": round(time.perf_counter() - t0, 2),
                "samples_stored": keep, "sample_dtype": dtype,
                "spread_calibration": calibrated, "local_spread": localised,
                "self_check": checked,
                } | fp.describe() | figures
        write_json(partial / "family.json", meta)
        shutil.rmtree(partial / "work.zarr", ignore_errors=True)
        (partial / CENTRE).unlink(missing_ok=True)  # a working file, not output
        run.close()
    with atomic_path(out, overwrite=storage.overwrite) as tmp:
        os.replace(partial, tmp)
    return out


__all__ = ["sample_file"]
