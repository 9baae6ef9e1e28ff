"""Posterior families on the tile engine: many restorations of one tomogram, each a
coherent whole, streamed sample by sample in bounded memory.

A family is made group by group: one pass of the tile engine
(`cryowae.tiling.engine.run_tiles` with ``channels = G``) restores every tile once
through the network's mean path and decodes G samples from it (sampler ``prior``; one
sample per pass for ``rotations`` and ``ensemble``, see `cryowae.sampling.samplers`).
Each sample's slabs go to its own sink as the engine finishes them, so memory holds one
slab buffer of G samples, the input's slab and one batch of tiles, whatever the
tomogram's size. Measured on the CPU (one thread, default `RestorerConfig`, branch
width 8, a 48^3 tile): the mean path took 0.34 s per tile, the branch 0.16 s per
sample alone and 0.43 s for 4 samples together, so groups of 4 cost 0.19 s per
sample and tile against 0.50 s one by one.

`sample_array` returns a family in memory (small volumes, tests, the napari plugin);
`cryowae.sampling.files.sample_file` streams one to disk and can resume. Both run
`run_family` below; mean and standard deviation are computed afterwards slab by slab
(`family_moments`), and the data-consistency check on a central crop
(`cryowae.sampling.consistency`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.models.protocol import Restorer
from cryowae.physics.geometry import TiltGeometry
from cryowae.precision import amp_active
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.sampling.consistency import CONSISTENCY, consistency_check
from cryowae.sampling.samplers import (
    EnsembleSampler,
    FieldSampler,
    RotationSampler,
    aligned_plan,
    check_sampler,
)
from cryowae.sampling.settings import SamplerSettings
from cryowae.tiling.engine import Sink, array_sink, run_tiles
from cryowae.tiling.pages import release_pages
from cryowae.tiling.plan import TilePlan

#: bytes of slab buffer (G samples x tile x Y x X float32) that choose the group size:
#: each group runs the mean path once, so larger groups restore fewer times (16 samples
#: of 512 x 512 slices with 96-voxel tiles: 8 per pass here, 2 with 256 MiB). On the
#: CPU the branch decodes one sample at a time (`samplers.CPU_BRANCH_SAMPLES`), so the
#: group costs this buffer, not G times the activations.
GROUP_BUFFER_BYTES = 1 << 30
#: at most this many samples per engine pass where the branch decodes the whole group
#: in one call (CUDA: G times the branch's activations); on the CPU the buffer alone
#: bounds the group, so that a family the buffer holds runs the mean path once per tile
MAX_GROUP = 8
#: block edge (voxels) of `family_moments`: the chunk edge of samples.zarr
MOMENT_BLOCK = 64


@dataclass
class FamilyResult:
    """A posterior family in memory (intensities in the input's units).

    Attributes
    ----------
    samples
        (S, Z, Y, X) float32.
    mean, std
        (Z, Y, X) float32 per-voxel mean and standard deviation (ddof = 0).
    info
        Parameters and figures (what ``family.json`` holds): sampler, plan, geometry,
        the consistency check per shell, the wedge/measured spread.
    """

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class CentreSink:
    """Where `run_family` streams the mean path's restoration: ``sink`` receives its
    blocks as the samples' sinks do; ``done()`` runs once it is complete."""

    sink: Sink
    done: Callable[[], None]


@dataclass
class FamilyPlan:
    """How a family is made: the sampler's tile functions, the plan, the groups."""

    sampler: str
    n_samples: int
    plan: TilePlan
    source: FieldSampler | RotationSampler | EnsembleSampler
    device: torch.device
    batch_size: int
    group: int
    geometry: TiltGeometry

    def groups(self, todo: Sequence[int]) -> list[list[int]]:
        """`todo` (sample indices) cut into groups of at most `group`."""
        t = list(todo)
        return [t[i:i + self.group] for i in range(0, len(t), self.group)]

    def describe(self) -> dict[str, Any]:
        return {"sampler": self.sampler, "n_samples": self.n_samples,
                "tile": list(self.plan.tile), "n_tiles": self.plan.n_tiles,
                "tile_starts": [list(a.starts) for a in self.plan.axes],
                "samples_per_pass": self.group, "geometry": self.geometry.to_dict(),
                "bf16_autocast": amp_active(self.device, self.source.amp),
                "branch_channels_last": bool(getattr(self.source, "channels_last", False))}


def _restorers(restorer: Restorer | Sequence[Restorer]) -> list[Any]:
    models = list(restorer) if isinstance(restorer, list | tuple) else [restorer]
    if not models:
        raise CryowaeInputError("no model given")
    return models


def plan_family(restorer: Restorer | Sequence[Restorer], shape: Sequence[int],
                sampling: SamplerSettings | None = None,
                geometry: TiltGeometry | None = None) -> FamilyPlan:
    """Validate the choices and set up the sampler for a (Z, Y, X) volume of `shape`.

    `restorer` is a `LoadedRestorer` (its ``stochastic`` attribute holds the branch for
    ``prior``), or a list of them for ``ensemble``. `geometry` defaults to the first
    model's. ``sampling.group``: samples per engine pass (``prior`` only; default: as
    many as `GROUP_BUFFER_BYTES` of slab buffer allow, on CUDA at most `MAX_GROUP`).
    """
    sampling = sampling or SamplerSettings()
    sampler, settings, group = sampling.sampler, sampling.tiles, sampling.group
    amp = sampling.amp
    models = _restorers(restorer)
    first = models[0]
    stochastic = getattr(first, "stochastic", None)
    n = check_sampler(sampler, sampling.n_samples, len(models), stochastic is not None)
    geometry = geometry or first.geometry
    device = torch.device(first.device)
    multiple = max(int(m.model.multiple) for m in models)
    plan = aligned_plan(settings, shape, multiple, cubic=sampler == "rotations")
    src: FieldSampler | RotationSampler | EnsembleSampler
    if sampler == "prior":
        src = FieldSampler(stochastic, plan, sampling.seed, device, amp,
                           sampling.channels_last)
        slab = plan.tile[0] * plan.shape[1] * plan.shape[2] * 4
        g = group if group is not None else max(1, GROUP_BUFFER_BYTES // max(1, slab))
    elif sampler == "rotations":
        src, g = RotationSampler(first.model, plan, geometry, device, amp), 1
    else:
        src, g = EnsembleSampler([m.model for m in models], device, amp), 1
    if int(g) < 1:
        raise CryowaeInputError(f"samples per pass must be >= 1, got {g}")
    most = MAX_GROUP if device.type == "cuda" else n
    return FamilyPlan(sampler, n, plan, src, device, settings.batch_size,
                      min(int(g), most, n), geometry)


def run_family(fp: FamilyPlan, data: Any, norm: tuple[float, float],
               sink_for: Callable[[int], Sink], todo: Sequence[int] | None = None,
               progress: ProgressReporter | None = None,
               on_done: Callable[[int], None] | None = None,
               centre: CentreSink | None = None) -> None:
    """Sample `todo` (default: all) of the family of `data` group by group, streaming
    sample s's blocks to ``sink_for(s)``; ``on_done(s)`` runs once sample s is
    complete. `centre` (``prior`` only): the mean path's restoration of the first
    group's pass streams to it as well (`CentreSink`), so that it is not restored
    again. Cancellation (`cryowae.progress.Cancelled`) stops between batches."""
    prog = ensure_progress(progress)
    groups = fp.groups(range(fp.n_samples) if todo is None else todo)
    if centre is not None and not isinstance(fp.source, FieldSampler):
        raise CryowaeInputError("the centre comes out of the sampling pass of the prior "
                                "sampler only")
    prog.start(fp.plan.n_tiles * len(groups), f"sampling ({fp.sampler})")
    try:
        for k, grp in enumerate(groups):
            sinks = [sink_for(s) for s in grp]
            with_mean = centre is not None and k == 0
            if with_mean:
                sinks = [centre.sink, *sinks]

            def sink(where: Any, block: np.ndarray, sinks: list[Sink] = sinks) -> None:
                if len(sinks) == 1:
                    sinks[0](where, block)
                    return
                for c, snk in enumerate(sinks):
                    snk(where, block[c])

            fn = fp.source.tile_fn(grp, with_mean=True) if with_mean \
                else fp.source.tile_fn(grp)
            run_tiles(fn, data, fp.plan, sink, norm=norm, device=fp.device,
                      batch_size=fp.batch_size, progress=prog, task="sampling",
                      channels=len(sinks))
            if with_mean:
                centre.done()
            for s in grp:
                if on_done is not None:
                    on_done(s)
    finally:
        prog.finish()


def family_moments(samples: Any, mean_out: Any, std_out: Any,
                   block: int | Sequence[int] = MOMENT_BLOCK) -> tuple[Any, Any]:
    """Per-voxel mean and standard deviation (ddof = 0) of (S, Z, Y, X) `samples`
    (numpy, zarr; any float dtype), written into (Z, Y, X) `mean_out` and `std_out`
    (arrays or memory maps) in blocks of `block` voxels (one edge, or (Z, Y, X) edges:
    a whole number of the store's chunks), so that memory holds S blocks in float64 and
    every chunk is read once."""
    s, z, y, x = (int(v) for v in np.shape(samples))
    bz, by, bx = (block,) * 3 if isinstance(block, int) else (int(b) for b in block)
    for z0 in range(0, z, bz):
        for y0 in range(0, y, by):
            for x0 in range(0, x, bx):
                where = (slice(z0, z0 + bz), slice(y0, y0 + by), slice(x0, x0 + bx))
                blk = np.asarray(samples[(slice(None), *where)], dtype=np.float64)
                m = blk.mean(axis=0)
                mean_out[where] = m.astype(np.float32)
                std_out[where] = np.sqrt(((blk - m) ** 2).mean(axis=0)).astype(np.float32)
        release_pages(mean_out, flush=True)
        release_pages(std_out, flush=True)
    return mean_out, std_out


def family_figures(samples: Any, mean_std: tuple[Any, Any], data: Any,
                   geometry: TiltGeometry, norm: tuple[float, float],
                   consistency: str = "check", even: Any = None,
                   odd: Any = None) -> dict[str, Any]:
    """The figures ``family.json`` records: relative voxel std, the consistency check
    and the wedge/measured spread (`cryowae.sampling.consistency`)."""
    if consistency not in CONSISTENCY:
        raise CryowaeInputError(f"unknown consistency {consistency!r}: choose from "
                                f"{', '.join(CONSISTENCY)} (the measured region is never "
                                "overwritten)")
    std_map = mean_std[1]
    z = int(np.shape(std_map)[0])
    tot = 0.0
    for i in range(0, z, 16):
        tot += float(np.asarray(std_map[i:i + 16], dtype=np.float64).sum())
        release_pages(std_map)
    rel = tot / float(np.prod(np.shape(std_map))) / norm[1]
    out: dict[str, Any] = {"voxel_std_relative": rel}
    if consistency == "check":
        out["consistency"] = consistency_check(samples, data, geometry, even, odd)
    return out


def sample_array(restorer: Restorer | Sequence[Restorer], data: Any,
                 sampling: SamplerSettings | None = None,
                 progress: ProgressReporter | None = None, *,
                 geometry: TiltGeometry | None = None, even: Any = None, odd: Any = None,
                 consistency: str = "check",
                 norm: tuple[float, float] | None = None) -> FamilyResult:
    """A posterior family of tomogram `data` in memory.

    Parameters
    ----------
    restorer
        A `LoadedRestorer` (with ``stochastic`` for the default ``prior`` sampler), or
        a list of them for ``sampler="ensemble"``.
    data
        (Z, Y, X) tomogram (numpy, memmap, zarr), any intensity scale; samples come back
        in the same units.
    sampling
        Family size, sampler, tiles, seed, samples per pass (`SamplerSettings`).
    geometry
        Tilt geometry of the data; default: the model's training geometry.
    even, odd
        Optional halves of `data`, for the noise power of the consistency check.
    consistency
        ``check`` (default: residual-to-noise ratio per shell) or ``none``.
    norm
        (mean, std) normalisation; default: the tomogram's global statistics.
    """
    from cryowae.io.stats import volume_stats

    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    shape = tuple(int(s) for s in np.shape(data))
    if len(shape) != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) tomogram, got shape {shape}")
    sampling = sampling or SamplerSettings()
    fp = plan_family(restorer, shape, sampling, geometry)
    norm = norm or volume_stats(data)
    t0 = time.perf_counter()
    samples = np.empty((fp.n_samples, *shape), dtype=np.float32)
    run_family(fp, data, norm, lambda s: array_sink(samples[s]), progress=progress)
    mean, std = family_moments(samples, np.empty(shape, np.float32),
                               np.empty(shape, np.float32))
    info = fp.describe() | {"seed": sampling.seed, "overlap": sampling.tiles.overlap,
                            "shape": list(shape),
                            "normalisation": {"mean": norm[0], "std": norm[1]},
                            "seconds": round(time.perf_counter() - t0, 2)}
    info |= family_figures(samples, (mean, std), data, fp.geometry, norm, consistency,
                           even, odd)
    return FamilyResult(samples, mean, std, info)


__all__ = ["CentreSink", "FamilyPlan", "FamilyResult", "family_figures", "family_moments",
           "plan_family", "run_family", "sample_array"]
