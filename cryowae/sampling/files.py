"""`sample_file`: a posterior family of a tomogram file, streamed to disk, resumable.

Output directory (appears complete, by one rename, or not at all):

    OUT/samples.zarr   OME-Zarr, axes (s, z, y, x), one sample per chunk along s
    OUT/mean.mrc       per-voxel mean of the samples
    OUT/std.mrc        per-voxel standard deviation (ddof = 0)
    OUT/family.json    parameters, the consistency check per shell, the spread, the
                       spread calibration (`cryowae.sampling.recalibrate`)

While it runs, the work lives in ``.OUT.partial/`` beside OUT: the zarr store and
``state.json`` (the run's fingerprint and the finished samples, rewritten atomically
after each group). A rerun with the same model, tomogram and settings continues from
the finished samples and, since sample s depends only on (seed, s), gives the same
family as an uninterrupted run; a rerun with other settings starts over (and says so).

Memory: the tomogram and the halves are memory-mapped and read slab by slab (the tile
engine), each sample streams into the zarr store, the spread calibration estimates its
factors on a central crop and filters each sample tile by tile in place, the mean and std
are computed from the store slab by slab into memory-mapped MRC files, and the check
reads a central crop.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path, check_output_path
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge_estimate import spectrum_warning
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.sampling.family import family_figures, family_moments, plan_family, run_family
from cryowae.sampling.recalibrate import calibrate_store, resolve_mode
from cryowae.sampling.samplers import DEFAULT_SAMPLER
from cryowae.tiling.engine import array_sink
from cryowae.tiling.pages import page_releasing, release_pages
from cryowae.tiling.settings import TileSettings


class _SampleView:
    """Write access to sample s of an (S, Z, Y, X) zarr array, for `array_sink`."""

    def __init__(self, arr: Any, s: int) -> None:
        self.arr, self.s = arr, int(s)
        self.shape = tuple(arr.shape[1:])

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.arr[(self.s, *key)] = value


def _json_ready(o: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, inf/nan as null, paths as text."""
    if isinstance(o, dict):
        return {str(k): _json_ready(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_json_ready(v) for v in o]
    if isinstance(o, np.floating | np.integer):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, bool | int | str):
        return o
    return str(o)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_ready(obj), indent=2, allow_nan=False) + "\n")


def _pyramid_levels(shape: tuple[int, ...], max_levels: int = 3, min_size: int = 16) -> int:
    levels = 1
    while levels < max_levels and min(shape) // 2**levels >= min_size:
        levels += 1
    return levels


def _fingerprint(paths: Sequence[Path], params: dict[str, Any]) -> dict[str, Any]:
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
             for p in paths if p.is_file()]
    return _json_ready({"files": files, "params": params})


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


def _centre(restorer: Any, data: Any, norm: tuple[float, float], settings: TileSettings,
            partial: Path, state: dict[str, Any], save: Any, prog: ProgressReporter) -> Any:
    """The mean path's restoration of the tomogram (as ``cryowae restore``), memory-mapped
    in ``partial/centre.npy``: the centre of a calibrated family (`calibrate_store`).
    Restored once; a resumed run reuses it."""
    from cryowae.inference.restore import restore_array

    path = partial / "centre.npy"
    if not (state.get("centre_ready") and path.is_file()):
        prog.log("family centre: the mean path's restoration")
        out = np.lib.format.open_memmap(path, "w+", np.float32, tuple(data.shape))
        restore_array(restorer, data, settings.tile, settings.overlap, settings.batch_size,
                      out=out, norm=norm)
        release_pages(out, flush=True)
        del out
        state["centre_ready"] = True
        save()
    return page_releasing(np.load(path, mmap_mode="r"))


def sample_file(model: Any, tomogram: str | os.PathLike, out_dir: str | os.PathLike,
                n_samples: int = 16, sampler: str = DEFAULT_SAMPLER, tile: int = 96,
                overlap: int = 32, batch_size: int = 4, seed: int = 0,
                device: str = "auto", even: str | os.PathLike | None = None,
                odd: str | os.PathLike | None = None,
                geometry: TiltGeometry | None = None, consistency: str = "check",
                group: int | None = None, overwrite: bool = False,
                progress: ProgressReporter | None = None,
                spread_calibration: str = "auto", amp: bool | None = None) -> Path:
    """Sample a family of a tomogram file into `out_dir` (module docstring).

    Parameters
    ----------
    model
        ``model.pt`` (or its run directory), an already loaded `LoadedRestorer`, or a
        list of either for ``sampler="ensemble"``.
    tomogram, even, odd
        MRC or OME-Zarr files (memory-mapped); the halves serve the noise power of the
        consistency check.
    geometry
        Tilt geometry; default: the model's (resolve options with `TiltGeometry.resolve`).
        One the tomogram's own spectrum contradicts is reported (`spectrum_warning`).
    spread_calibration
        ``auto`` (``halves`` when the halves are given, else ``data``), ``halves``,
        ``data`` or ``none``: the per-shell widening of the finished samples about their
        mean before the moments are written (`cryowae.sampling.recalibrate.calibrate_store`),
        recorded in ``family.json`` under ``spread_calibration``.
    amp
        bf16 autocast of the networks (`cryowae.precision.amp_active`; None: the
        device's default).
    Other parameters as `cryowae.sampling.family.sample_array`.
    """
    from cryowae.inference.restore import voxel_size_warning
    from cryowae.io import open_mrc_writer
    from cryowae.io.omezarr import OmeZarrWriter
    from cryowae.io.stats import volume_stats

    prog = ensure_progress(progress)
    out = check_output_path(out_dir, overwrite)
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    resolve_mode(spread_calibration, even is not None)
    many = isinstance(model, list | tuple)
    restorers = [_load(m, device) for m in (model if many else [model])]
    settings = TileSettings(tile, overlap, batch_size)
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
        fp = plan_family(restorers if many else restorers[0], vol.shape, n_samples,
                         sampler, settings, seed, geometry, group, amp)
        norm = volume_stats(page_releasing(vol.data))
        params = fp.describe() | {"seed": int(seed), "overlap": int(overlap),
                                  "spread_calibration": spread_calibration,
                                  "norm": list(norm), "models": [str(getattr(r, "path", ""))
                                                                 for r in restorers]}
        paths = [Path(p) for p in (tomogram, even, odd) if p is not None]
        paths += [Path(getattr(r, "path", "")) for r in restorers if getattr(r, "path", "")]
        finger = _fingerprint(paths, params)
        state_path = partial / "state.json"
        done: list[int] = []
        calib_state: dict[str, Any] = {}
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") == finger:
                done = sorted(int(s) for s in state.get("done", []))
                calib_state = state.get("calibration", {})
                prog.log(f"resuming: {len(done)} of {fp.n_samples} samples already done")
            else:
                prog.log(f"{partial}: left by a run with other settings; starting over")
                shutil.rmtree(partial)
        elif partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        shape = vol.shape
        writer = OmeZarrWriter(partial / "samples.zarr", (fp.n_samples, *shape),
                               vol.voxel_size, _pyramid_levels(shape),
                               (1, *(min(64, s) for s in shape)), ("s",), vol.origin,
                               {"cryowae": {"kind": "posterior-family",
                                            "version": __version__, "sampler": sampler}})
        level0 = writer.level0

        def save_state() -> None:
            _write_json(state_path, {"fingerprint": finger, "done": sorted(done),
                                     "calibration": calib_state})

        def finished(s: int) -> None:
            done.append(int(s))
            save_state()

        t0 = time.perf_counter()
        todo = [s for s in range(fp.n_samples) if s not in set(done)]
        run_family(fp, vol.data, norm, lambda s: array_sink(_SampleView(level0, s)),
                   todo, prog, finished)
        if spread_calibration != "none":
            prog.log(f"spread calibration ({resolve_mode(spread_calibration, even is not None)})"
                     f": per-shell factors, then {fp.n_samples} samples filtered")
        stochastic = getattr(restorers[0], "stochastic", None) if fp.sampler == "prior" \
            else None
        centre, restore = None, None
        if stochastic is not None and spread_calibration != "none":
            centre = _centre(restorers[0], vol.data, norm, settings, partial, calib_state,
                             save_state, prog)
            from cryowae.inference.restore import restore_array

            # the centre's restoration as a function of an array (same tiles and
            # normalisation as `_centre`): what the calibration's SURE differentiates
            restore = functools.partial(restore_array, restorers[0], tile=settings.tile,
                                        overlap=settings.overlap,
                                        batch_size=settings.batch_size, norm=norm)
        # page-releasing views: the wedge ratio scans the whole tomogram (statistics,
        # structure map), which would otherwise leave its pages resident
        calibration = calibrate_store(level0, page_releasing(vol.data), fp.geometry,
                                      spread_calibration, calib_state, save_state, partial,
                                      *(None if h is None else page_releasing(h)
                                        for h in halves),
                                      model=stochastic, centre=centre, restore=restore)
        del centre
        per_slice = 2 * fp.n_samples * shape[1] * shape[2] * 4  # pyramid: ~8 MiB slabs
        writer.finish(slab=max(1, min(32, (8 << 20) // max(1, per_slice))))
        for name in ("mean.mrc", "std.mrc"):
            (partial / name).unlink(missing_ok=True)
        with open_mrc_writer(partial / "mean.mrc", shape, vol.voxel_size, origin=vol.origin,
                             overwrite=True) as m_out, \
                open_mrc_writer(partial / "std.mrc", shape, vol.voxel_size,
                                origin=vol.origin, overwrite=True) as s_out:
            family_moments(level0, m_out, s_out)
            release_pages(m_out, flush=True)
            release_pages(s_out, flush=True)
            figures = family_figures(level0, (m_out, s_out), vol.data, fp.geometry, norm,
                                     consistency, *halves)
        meta = {"cryowae_version": __version__, "kind": "posterior-family",
                "tomogram": str(tomogram), "even": str(even) if even else None,
                "odd": str(odd) if odd else None, "voxel_size": vol.voxel_size,
                "origin": list(vol.origin), "std_ddof": 0, "shape": list(shape),
                "files": {"samples": "samples.zarr", "mean": "mean.mrc", "std": "std.mrc"},
                "parameters": params | {"tile_setting": tile, "batch_size": batch_size,
                                        "device": str(fp.device),
                                        "consistency": consistency},
                "sampling_seconds_this_run": round(time.perf_counter() - t0, 2),
                "spread_calibration": calibration,
                } | fp.describe() | figures
        _write_json(partial / "family.json", meta)
        (partial / "centre.npy").unlink(missing_ok=True)  # a working file, not output
        state_path.unlink()
    with atomic_path(out, overwrite=overwrite) as tmp:
        os.replace(partial, tmp)
    return out


__all__ = ["sample_file"]
