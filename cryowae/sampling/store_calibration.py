"""The spread calibration of a family held in a writable (S, Z, Y, X) store (a zarr
array), in place and resumable.

Each sample X_s becomes ``base + F^-1[a(k) F(X_s - m)]`` (`cryowae.sampling.recalibrate`),
m the family mean, `base` the centre (the mean path's restoration) or m. The maths are
the functions `store_mean`, `filter_deviation` and `add_base`, each writing a whole
volume slab by slab; `calibrate_store` is the resume state machine that runs them in
order and records each finished step, so that a rerun never filters a sample twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling.recalibrate import ShellFactors, estimate_factors, resolve_mode
from cryowae.tiling.engine import array_sink, run_tiles
from cryowae.tiling.pages import page_releasing, release_pages
from cryowae.tiling.plan import TilePlan
from cryowae.tiling.settings import TileSettings

_DIMS = (-3, -2, -1)
#: bytes of one slab read by `store_mean` (float64) and `add_base` (float32)
SLAB_BYTES = 4 << 20


class _Difference:
    """Array view of ``samples[s] - mean`` for the tile engine (slab reads only)."""

    def __init__(self, samples: Any, s: int, mean: Any) -> None:
        self.samples, self.s, self.mean = samples, int(s), mean
        self.shape, self.dtype = tuple(mean.shape), np.dtype(np.float32)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.samples[(self.s, *key)], np.float32) - self.mean[key]


def _filter_fn(factors: ShellFactors, geometry: TiltGeometry) -> Any:
    """Tile function of the engine: each tile's spectrum times the factor map of its
    own grid."""
    maps: dict[tuple[int, ...], torch.Tensor] = {}

    def fn(x: torch.Tensor, _refs: Any) -> torch.Tensor:
        shp = tuple(int(v) for v in x.shape[-3:])
        if shp not in maps:
            maps[shp] = factors.coefficient_map(shp, geometry).to(x.device)  # type: ignore[arg-type]
        spec = torch.fft.rfftn(x.float(), dim=_DIMS) * maps[shp]
        return torch.fft.irfftn(spec, s=shp, dim=_DIMS)

    return fn


def _slab(shape: tuple[int, ...], itemsize: int) -> int:
    return max(1, SLAB_BYTES // max(1, itemsize * shape[1] * shape[2]))


def store_mean(samples: Any, out: Any) -> Any:
    """m = (1/S) sum_s X_s per voxel of (S, Z, Y, X) `samples`, summed in float64 slab
    by slab, into the (Z, Y, X) float32 `out`."""
    n, shape = int(samples.shape[0]), tuple(int(v) for v in samples.shape[1:])
    step = _slab(shape, 8)
    for z in range(0, shape[0], step):
        acc = np.zeros((min(step, shape[0] - z), *shape[1:]), np.float64)
        for i in range(n):
            acc += np.asarray(samples[i, z:z + step], np.float64)
        out[z:z + step] = acc / n
        release_pages(out, flush=True)
    return out


def filter_deviation(samples: Any, i: int, mean: Any, factors: ShellFactors,
                     geometry: TiltGeometry, plan: TilePlan, out: Any) -> Any:
    """``F^-1[a(k) F(X_i - m)]`` of sample `i` into the (Z, Y, X) `out`, by the tile
    engine on `plan` (each tile filtered with its own grid's factor map, overlaps
    blended)."""
    run_tiles(_filter_fn(factors, geometry), _Difference(samples, i, mean), plan,
              array_sink(out), norm=(0.0, 1.0), device="cpu", batch_size=1,
              task="spread calibration")
    release_pages(out, flush=True)
    return out


def add_base(samples: Any, i: int, filtered: Any, base: Any) -> None:
    """``samples[i] = filtered + base`` slab by slab (float32)."""
    shape = tuple(int(v) for v in filtered.shape)
    step = _slab(shape, 4)
    for z in range(0, shape[0], step):
        samples[i, z:z + step] = filtered[z:z + step] + np.asarray(base[z:z + step],
                                                                   np.float32)


def calibrate_store(samples: Any, data: Any, geometry: TiltGeometry, mode: str,
                    state: dict[str, Any], save: Callable[[], None], workdir: Path,
                    even: Any = None, odd: Any = None, tile: int = 64,
                    overlap: int = 32, model: Any = None, centre: Any = None,
                    wedge_floor: bool = True,
                    restore: Callable[[np.ndarray], Any] | None = None) -> dict[str, Any]:
    """Recalibrate the spread of a family in a writable (S, Z, Y, X) store in place,
    resumably; returns what ``family.json`` records.

    `mode`: one of `SPREAD_CALIBRATIONS`. Steps, each recorded in `state` and `save`d:
    the factors (`estimate_factors`, with the stochastic restorer `model` for the wedge
    ratio and the centre's restoration `restore` for the error); the per-voxel mean
    (`store_mean` into ``workdir/calib_mean.npy``; the recalibration leaves it
    unchanged); then per sample the filtered difference (`filter_deviation`,
    `tile`-voxel tiles, `overlap` blended) into ``workdir/calib_sample.npy``, and its
    copy plus the base into the store (`add_base`): `centre` (Z, Y, X), e.g. the mean
    path's restoration, so that the family mean is the restorer's own estimate and not
    that plus the average of S branch draws; default the family mean (unchanged). A
    rerun continues where the last stopped and never filters a sample twice. Memory:
    the crops of the estimate and the engine's slabs; the volumes stay on disk."""
    mode = resolve_mode(mode, even is not None and odd is not None)
    if mode == "none":
        return {"mode": "none"}
    n, shape = int(samples.shape[0]), tuple(int(v) for v in samples.shape[1:])
    if "factors" not in state:
        factors, info = estimate_factors(samples, data, geometry, mode, even, odd, model,
                                         wedge_floor, restore)
        state.update(factors=factors.to_dict(), estimate=info, rewritten=[])
        save()
    factors = ShellFactors.from_dict(state["factors"])
    mean_path, tmp_path = workdir / "calib_mean.npy", workdir / "calib_sample.npy"
    todo = [i for i in range(n) if i not in set(state["rewritten"])]
    if todo and not state.get("mean_ready"):
        mean = np.lib.format.open_memmap(mean_path, "w+", np.float32, shape)
        store_mean(samples, mean)
        del mean
        state["mean_ready"] = True
        save()
    plan = TileSettings(tile, overlap, 1).plan(shape, 1)
    mean = page_releasing(np.load(mean_path, mmap_mode="r")) if todo else None
    for i in todo:
        if state.get("filtered") != i:
            out = np.lib.format.open_memmap(tmp_path, "w+", np.float32, shape)
            filter_deviation(samples, i, mean, factors, geometry, plan, out)
            del out
            state["filtered"] = i
            save()
        filt = page_releasing(np.load(tmp_path, mmap_mode="r"))
        add_base(samples, i, filt, mean if centre is None else centre)
        state["rewritten"].append(i)
        save()
    for p in (mean_path, tmp_path):
        p.unlink(missing_ok=True)
    return {"mode": mode, "factors": factors.to_dict(), "estimate": state["estimate"],
            "centre": "family mean" if centre is None else "restoration",
            "tile": list(plan.tile), "overlap": overlap,
            "columns": "factors per shell of factors.frequency (cycles per voxel, crop "
                       "grid); estimate: error and spread per coefficient, data units^2"}


__all__ = ["add_base", "calibrate_store", "filter_deviation", "store_mean"]
