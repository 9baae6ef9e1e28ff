"""Posterior families: many plausible restorations of one tomogram that agree with the data.

`sample_array` returns a family in memory; `sample_file` streams one to disk, holding one
sample at a time (plus a running mean and M2, Welford) so any tomogram fits:

    OUT_DIR/samples.zarr   OME-Zarr, axes (s, z, y, x), one sample per chunk along s
    OUT_DIR/mean.mrc       per-voxel mean of the samples
    OUT_DIR/std.mrc        per-voxel standard deviation (ddof = 0, as numpy's default)
    OUT_DIR/family.json    parameters and figures
    OUT_DIR/noise_std.mrc  with even/odd halves: the data's own noise per voxel, which
                           hard consistency puts into every sample (not in std.mrc)

A sample is made in three steps: every tile (subtomogram) of the globally normalised
tomogram is restored by the network - decoded with a code chosen by the sampler, or
rotated, or by another ensemble member -, the tiles are blended with a cosine window,
and data consistency is imposed on the whole blended tomogram (`consistency.py`).

Samplers (``sampler=``):
* ``ot`` (default): codes from the rows of the entropic OT plan between the tiles' codes
  and the prior (`ot_sampler.OTCodeSampler`); `epsilon` is the diversity knob.
* ``gaussian``: each tile's own code plus Gaussian noise (epsilon x the prior's sigma,
  or a Gaussian encoder's own std).
* ``rotations``: test-time rotations. Each sample restores copies of the tiles rotated
  by one of the 24 proper rotations of the cube (exact, no interpolation; identity
  first); as in training, the tomogram's own missing wedge is removed again from the
  rotated input, the network restores it, and the result is rotated back. The spread
  comes from the network's lack of rotation equivariance. At most 24 samples.
* ``ensemble``: one sample per independently trained model (pass several restorers).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.physics.wedge import apply_fourier_mask, wedge_mask
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.sampling.consistency import (
    noise_std_from_halves,
    prepare_consistency,
    region_energy_of_spectrum,
)
from cryowae.sampling.ot_sampler import (
    CodeSampler,
    GaussianCodeSampler,
    OTCodeSampler,
    cube_rotations,
    restorer_prior_sigma,
    rotate_cube,
)
from cryowae.tiling.plan import AxisPlan, TilePlan, plan_tiles, round_up

SAMPLERS = ("ot", "gaussian", "rotations", "ensemble")
#: above this many voxels the running mean / M2 are kept in float32 instead of float64
_F64_VOXELS = 1 << 26


class SamplingCancelled(RuntimeError):
    """The progress reporter asked the sampling to stop; nothing was written."""


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
        Parameters and figures: sampler, epsilon, effective codes per tile, consistency
        mode, Fourier energy of sample-to-sample differences in the wedge vs measured
        region, ... (what ``family.json`` holds).
    noise_std
        With even/odd halves: (Z, Y, X) per-voxel std of the data's own noise
        (`consistency.noise_std_from_halves`), which hard consistency puts identically
        into every sample; ``sqrt(std**2 + noise_std**2)`` is the total uncertainty.
    """

    samples: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    noise_std: np.ndarray | None = None


# ------------------------------------------------------------------------- tiling
# The tile geometry is `cryowae.inference.tiling` (the same as `cryowae restore`: reflect
# padding, separable cosine window, weight sum). Rotations need cubic tiles: axes whose
# plan has a shorter tile get the cubic tile and more reflect padding.
def _plan(shape: tuple[int, int, int], tile: int, overlap: int, multiple: int,
          cubic: bool) -> TilePlan:
    t = round_up(int(tile), multiple)
    if overlap < 0 or overlap >= t:
        raise CryowaeInputError(f"--overlap {overlap} must lie in [0, tile {t})")
    plan = plan_tiles(shape, t, int(overlap), multiple, "cosine")
    if not cubic or len(set(plan.tile)) == 1:
        return plan
    c = max(plan.tile)
    axes = []
    for a in plan.axes:
        if a.tile == c:
            axes.append(a)
        else:  # one tile along this axis (size <= its tile < c): pad it to c
            before = (c - a.size) // 2
            axes.append(AxisPlan(a.size, c, before, c - a.size - before, (0,)))
    return TilePlan(tuple(axes), plan.window)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- engine
TileFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


class _Engine:
    """Restores a normalised tomogram tile by tile with a per-tile function."""

    def __init__(self, xn: np.ndarray, plan: TilePlan, device: torch.device,
                 batch_size: int, progress: ProgressReporter) -> None:
        self.xn = xn
        self.plan = plan
        self.device = device
        self.batch = max(1, int(batch_size))
        self.progress = progress
        self.win = torch.from_numpy(plan.tile_window()).to(device)
        az, ay, ax = plan.axes
        self.tiles = [(zs, ys, xs) for zs in az.starts for ys in ay.starts
                      for xs in ax.starts]
        wz, wy, wx = (a.weight_sum(plan.window).astype(np.float32) for a in plan.axes)
        self.inv_weight = 1.0 / (wz[:, None, None] * wy[None, :, None] * wx[None, None, :])

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    def batches(self) -> Iterator[tuple[list[int], torch.Tensor]]:
        az, ay, ax = self.plan.axes
        for b0 in range(0, len(self.tiles), self.batch):
            idx = list(range(b0, min(len(self.tiles), b0 + self.batch)))
            x = np.stack([self.xn[np.ix_(az.real_indices(zs), ay.real_indices(ys),
                                         ax.real_indices(xs))]
                          for zs, ys, xs in (self.tiles[i] for i in idx)])
            yield idx, torch.from_numpy(np.ascontiguousarray(x))[:, None].to(self.device)

    def _tick(self, n: int, **info: Any) -> None:
        self.progress.advance(n, **info)
        if self.progress.cancelled:
            raise SamplingCancelled("sampling cancelled; no output was written")

    def encode_all(self, model: torch.nn.Module, gaussian: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Codes (n_tiles, d) of every tile, and the encoder std for a Gaussian encoder."""
        codes, stds = [], []
        with torch.inference_mode():
            for idx, x in self.batches():
                stats, _, _ = model.encode_features(x)
                if gaussian:
                    mu, logvar = stats.chunk(2, dim=1)
                    codes.append(mu.float().cpu())
                    stds.append((0.5 * logvar.clamp(-10, 4)).exp().float().cpu())
                else:
                    codes.append(stats.float().cpu())
                self._tick(len(idx), stage="encode")
        return torch.cat(codes), (torch.cat(stds) if stds else None)

    def restore(self, fn: TileFn, **info: Any) -> np.ndarray:
        """One blended restoration (normalised units, the tomogram's shape)."""
        az, ay, ax = self.plan.axes
        acc = torch.zeros(self.plan.shape, dtype=torch.float32, device=self.device)
        with torch.inference_mode():
            for idx, x in self.batches():
                y = fn(x, idx).float()[:, 0] * self.win
                for k, i in enumerate(idx):
                    zs, ys, xs = self.tiles[i]
                    (z0, z1), (y0, y1), (x0, x1) = (a.real_range(s) for a, s in
                                                    zip(self.plan.axes, (zs, ys, xs),
                                                        strict=True))
                    oz, oy, ox = (z0 - zs + az.pad_before, y0 - ys + ay.pad_before,
                                  x0 - xs + ax.pad_before)
                    acc[z0:z1, y0:y1, x0:x1] += y[k, oz:oz + z1 - z0, oy:oy + y1 - y0,
                                                  ox:ox + x1 - x0]
                self._tick(len(idx), **info)
        out = acc.cpu().numpy()
        out *= self.inv_weight
        return out


def _models(restorer: Any) -> list[Any]:
    if isinstance(restorer, (list, tuple)):
        models = list(restorer)
    else:
        models = [restorer]
    if not models:
        raise CryowaeInputError("no model given")
    return models


@dataclass
class FamilyStream:
    """Samples of one family, produced one at a time (see `stream_family`).

    Iterate to get each sample (Z, Y, X float32, the input's units); `info` is complete
    once the iteration has ended (figures that need all samples are added then).
    """

    n_samples: int
    shape: tuple[int, int, int]
    info: dict[str, Any]
    _gen: Iterator[np.ndarray]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self._gen


def stream_family(restorer: Any, data: Any, n_samples: int = 16, sampler: str = "ot",
                  epsilon: float = 0.5, consistency: str = "hard", tile: int = 96,
                  overlap: int = 32, batch_size: int = 4, seed: int = 0,
                  progress: ProgressReporter | None = None, *, even: Any = None,
                  odd: Any = None, interpolation: float = 1.0, prior: str = "auto",
                  n_prior: int | None = None,
                  tilt_range: tuple[float, float] | None = None) -> FamilyStream:
    """Set up a family and return a stream that yields its samples one at a time.

    Same parameters as `sample_array`. Memory: the normalised tomogram, its spectrum (for
    consistency), one accumulator and one sample; the tiles' codes are computed before
    the first sample.
    """
    models = _models(restorer)
    if sampler not in SAMPLERS:
        raise CryowaeInputError(f"unknown sampler {sampler!r}: choose from {', '.join(SAMPLERS)}")
    if sampler != "ensemble" and len(models) > 1:
        raise CryowaeInputError(f"several models were given: use --sampler ensemble "
                                f"(not {sampler})")
    if sampler == "ensemble":
        if n_samples != len(models):
            n_samples = len(models)
        if n_samples < 2:
            raise CryowaeInputError("--sampler ensemble needs at least two models")
    n_samples = int(n_samples)
    if n_samples < 1:
        raise CryowaeInputError(f"--n must be positive, got {n_samples}")
    if sampler == "rotations" and n_samples > 24:
        raise CryowaeInputError(f"--sampler rotations gives at most 24 distinct samples "
                                f"(the cube's rotations), asked for {n_samples}")
    from cryowae.io.stats import volume_stats

    first = models[0]
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) tomogram, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CryowaeInputError("the tomogram contains NaN or infinite voxels")
    shape = tuple(int(s) for s in arr.shape)
    lo, hi = tilt_range if tilt_range is not None else (first.tilt_min, first.tilt_max)
    axis = first.tilt_axis
    mean, std = volume_stats(arr)
    xn = (arr - np.float32(mean)) / np.float32(std)
    del arr
    multiple = max(int(m.model.multiple) for m in models)
    plan = _plan(shape, tile, overlap, multiple, cubic=sampler == "rotations")  # type: ignore[arg-type]
    prog = ensure_progress(progress)
    device = first.device
    eng = _Engine(xn, plan, device, batch_size, prog)
    cons = prepare_consistency(xn, consistency, lo, hi, axis, even, odd)
    info: dict[str, Any] = {
        "sampler": sampler, "n_samples": n_samples, "epsilon": float(epsilon),
        "consistency": cons.info(), "seed": int(seed),
        "tile": list(plan.tile), "overlap": int(overlap), "n_tiles": eng.n_tiles,
        "shape": list(shape), "tilt_range": [float(lo), float(hi)], "tilt_axis": axis,
        "normalisation": {"mean": mean, "std": std},
        "models": [str(getattr(m, "path", "")) for m in models],
    }
    needs_codes = sampler in ("ot", "gaussian")
    prog.start(eng.n_tiles * (n_samples + (1 if needs_codes else 0)),
               f"sampling ({sampler})")
    code_sampler: CodeSampler | None = None
    if needs_codes:
        model = first.model
        gaussian_enc = model.config.encoder == "gaussian"
        try:
            codes, enc_std = eng.encode_all(model, gaussian_enc)
        except BaseException:
            prog.finish()
            raise
        sigma = restorer_prior_sigma(first.train_config)
        if sampler == "ot":
            code_sampler = OTCodeSampler(first.codes, sigma, epsilon, interpolation, prior,
                                         n_prior, seed)
            info["ot"] = code_sampler.setup(codes)
            for note in info["ot"]["notes"]:
                prog.log(f"note: {note}")
        else:
            gs = GaussianCodeSampler(sigma, epsilon, seed)
            info["gaussian"] = gs.setup(codes, enc_std)
            code_sampler = gs
    rotations = cube_rotations() if sampler == "rotations" else None
    if rotations is not None:
        tile_mask = wedge_mask(plan.tile, lo, hi, axis, rfft=True, device=device)

    def tile_fn(s: int) -> TileFn:
        if code_sampler is not None:
            z_all = code_sampler.codes(s).to(device)
            model = first.model

            def fn(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
                _, skips = model.encode(x)
                return model.decode(z_all[idx], skips, x)
            return fn
        if rotations is not None:
            r = rotations[s]
            model = first.model
            identity = s == 0

            def fn_rot(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
                if identity:
                    return model(x)[0]
                xr = apply_fourier_mask(rotate_cube(x, r), tile_mask)
                return rotate_cube(model(xr)[0], r, inverse=True)
            return fn_rot
        member = models[s].model

        def fn_ens(x: torch.Tensor, idx: list[int]) -> torch.Tensor:
            return member(x)[0]
        return fn_ens

    def gen() -> Iterator[np.ndarray]:
        try:
            yield from _produce()
        finally:
            prog.finish()

    def _produce() -> Iterator[np.ndarray]:
        t0 = time.perf_counter()
        dt = np.float64 if int(np.prod(shape)) <= _F64_VOXELS else np.float32
        run_mean = np.zeros(shape, dtype=dt)
        m2 = np.zeros(shape, dtype=dt)
        e_wedge = e_meas = 0.0
        mask = wedge_mask(shape, lo, hi, axis, rfft=True)
        for s in range(n_samples):
            restored = eng.restore(tile_fn(s), sample=f"{s + 1}/{n_samples}")
            if not np.all(np.isfinite(restored)):
                raise CryowaeInputError(
                    f"the restorer produced NaN or infinite values in sample {s}; the "
                    "checkpoint may be corrupt (try --device cpu); no output was written")
            restored = cons.apply(restored)
            out = (restored * np.float32(std) + np.float32(mean)).astype(np.float32)
            # Welford. The Fourier energy of delta = x_s - mean_{s-1} is (1 + 1/s) times
            # the per-frequency variance in expectation: the same factor in both regions.
            delta = out - run_mean
            if s > 0:
                spec = torch.fft.rfftn(torch.from_numpy(delta.astype(np.float32)))
                ew, em = region_energy_of_spectrum(spec, mask, shape)  # type: ignore[arg-type]
                e_wedge += ew
                e_meas += em
                del spec
            run_mean += delta / (s + 1)
            m2 += delta * (out - run_mean)
            yield out
        std_map = np.sqrt(m2 / n_samples).astype(np.float32)
        info["_mean"] = run_mean.astype(np.float32)
        info["_std"] = std_map
        if even is not None and odd is not None:
            noise = noise_std_from_halves(eng.xn, even, odd) * np.float32(std)
            info["_noise_std"] = noise
            info["noise"] = {
                "noise_std_mean": float(noise.mean()),
                "noise_over_family_std": float(noise.mean() / max(std_map.mean(), 1e-30)),
                "note": "per-voxel std of the data's own noise (even/odd halves, 5^3 "
                        "voxels): hard consistency puts it in every sample, so the "
                        "family's std does not show it; total = sqrt(std^2 + noise^2)",
            }
        info["figures"] = {
            "voxel_std_mean": float(std_map.mean()),
            "voxel_std_relative": float(std_map.mean() / std),
            "diff_energy_wedge": e_wedge / max(1, n_samples - 1),
            "diff_energy_measured": e_meas / max(1, n_samples - 1),
            "diff_energy_ratio_wedge_over_measured": (e_wedge / e_meas if e_meas > 0
                                                      else float("inf")),
            "seconds": round(time.perf_counter() - t0, 2),
        }

    return FamilyStream(n_samples, shape, info, gen())  # type: ignore[arg-type]


def sample_array(restorer: Any, data: Any, n_samples: int = 16, sampler: str = "ot",
                 epsilon: float = 0.5, consistency: str = "hard", tile: int = 96,
                 overlap: int = 32, batch_size: int = 4, seed: int = 0,
                 progress: ProgressReporter | None = None, *, even: Any = None,
                 odd: Any = None, interpolation: float = 1.0, prior: str = "auto",
                 n_prior: int | None = None,
                 tilt_range: tuple[float, float] | None = None) -> FamilyResult:
    """A posterior family of tomogram `data` in memory.

    Parameters
    ----------
    restorer
        A `LoadedRestorer` (`cryowae.models.checkpoint.load_restorer`), or a list of
        them for ``sampler="ensemble"``.
    data
        (Z, Y, X) tomogram (numpy, memmap, zarr), any intensity scale; samples come back
        in the same units.
    n_samples
        Family size S (ignored for ``ensemble``: one sample per model; at most 24 for
        ``rotations``).
    sampler
        ``ot`` (default), ``gaussian``, ``rotations`` or ``ensemble`` (module docstring).
    epsilon
        ``ot``: relative entropic temperature (smaller -> fewer effective codes per
        tile, less spread); ``gaussian``: noise std in units of the prior's sigma.
    consistency
        ``hard`` (measured Fourier region = the data), ``soft`` (noise-aware, needs
        `even` and `odd`; falls back to hard without) or ``none``.
    tile, overlap, batch_size
        Cubic tile size and overlap (voxels), tiles per network call.
    seed
        Seed of every random choice (prior sample, code draws, noise).
    even, odd
        Even/odd half tomograms for ``consistency="soft"``.
    interpolation
        ``ot``: decode with z_i + t (y_j - z_i), t in [0, 1] (1: the drawn code).
    prior, n_prior
        ``ot``: target measure (``auto``, ``gaussian``, ``codes``, ``mixed``) and size.
    tilt_range
        (min, max) degrees; default: the model's training tilt range.
    """
    stream = stream_family(restorer, data, n_samples, sampler, epsilon, consistency, tile,
                           overlap, batch_size, seed, progress, even=even, odd=odd,
                           interpolation=interpolation, prior=prior, n_prior=n_prior,
                           tilt_range=tilt_range)
    samples = np.empty((stream.n_samples, *stream.shape), dtype=np.float32)
    for s, x in enumerate(stream):
        samples[s] = x
    info = stream.info
    mean, std = info.pop("_mean"), info.pop("_std")
    return FamilyResult(samples=samples, mean=mean, std=std, info=info,
                        noise_std=info.pop("_noise_std", None))


def _pyramid_levels(shape: tuple[int, int, int], max_levels: int = 3, min_size: int = 16
                    ) -> int:
    levels = 1
    while levels < max_levels and min(shape) // 2**levels >= min_size:
        levels += 1
    return levels


def _json_ready(o: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, inf/nan as null, paths as text."""
    if isinstance(o, dict):
        return {str(k): _json_ready(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_ready(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


def sample_file(model: str | os.PathLike | Sequence[str | os.PathLike], tomogram: str | os.PathLike,
                out_dir: str | os.PathLike, n_samples: int = 16, sampler: str = "ot",
                epsilon: float = 0.5, consistency: str = "hard", tile: int = 96,
                overlap: int = 32, batch_size: int = 4, seed: int = 0,
                device: str = "auto", even: str | os.PathLike | None = None,
                odd: str | os.PathLike | None = None, interpolation: float = 1.0,
                prior: str = "auto", n_prior: int | None = None,
                tilt_range: tuple[float, float] | None = None, overwrite: bool = False,
                progress: ProgressReporter | None = None) -> Path:
    """Sample a family of the tomogram file and write it to `out_dir` (atomically).

    `model` is a ``model.pt`` (or run directory), or several for ``sampler="ensemble"``.
    Writes ``samples.zarr`` (s, z, y, x), ``mean.mrc``, ``std.mrc`` and ``family.json``
    with the tomogram's voxel size and origin. The directory is built under a temporary
    name and renamed at the end; an existing `out_dir` is refused unless `overwrite`.
    Memory holds one sample at a time (plus the running mean and M2), never the family.
    """
    from cryowae.devices import resolve_device
    from cryowae.io import read_volume, write_mrc
    from cryowae.io.atomic import atomic_path, check_output_path
    from cryowae.io.omezarr import OmeZarrWriter
    from cryowae.models.checkpoint import load_restorer

    out = check_output_path(out_dir, overwrite)
    dev = resolve_device(device)
    paths = [model] if isinstance(model, (str, os.PathLike)) else list(model)
    restorers = [load_restorer(p, dev) for p in paths]
    vol = read_volume(tomogram, check_nan=True)
    halves = [read_volume(h, check_nan=True).numpy() if h is not None else None
              for h in (even, odd)]
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    stream = stream_family(restorers if len(restorers) > 1 else restorers[0], vol.numpy(),
                           n_samples, sampler, epsilon, consistency, tile, overlap,
                           batch_size, seed, progress, even=halves[0], odd=halves[1],
                           interpolation=interpolation, prior=prior, n_prior=n_prior,
                           tilt_range=tilt_range)
    shape = stream.shape
    s_count = stream.n_samples
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        chunk = tuple(min(64, s) for s in shape)
        writer = OmeZarrWriter(tmp / "samples.zarr", (s_count, *shape), vol.voxel_size,
                               _pyramid_levels(shape), (1, *chunk), ("s",), vol.origin,
                               {"cryowae": {"kind": "posterior-family", "version": __version__,
                                            "sampler": sampler}})
        for s, x in enumerate(stream):
            writer.level0[s] = x
        # pyramid slabs sized so that all samples' slab fits in ~256 MB
        per_slice = 2 * s_count * shape[1] * shape[2] * 4
        writer.finish(slab=max(1, min(32, (256 << 20) // max(1, per_slice))))
        info = stream.info
        mean, std = info.pop("_mean"), info.pop("_std")
        write_mrc(tmp / "mean.mrc", mean, vol.voxel_size, vol.origin)
        write_mrc(tmp / "std.mrc", std, vol.voxel_size, vol.origin)
        files = {"samples": "samples.zarr", "mean": "mean.mrc", "std": "std.mrc"}
        noise = info.pop("_noise_std", None)
        if noise is not None:
            write_mrc(tmp / "noise_std.mrc", noise, vol.voxel_size, vol.origin)
            files["noise_std"] = "noise_std.mrc"
        meta = {
            "cryowae_version": __version__, "kind": "posterior-family",
            "tomogram": str(tomogram), "even": str(even) if even else None,
            "odd": str(odd) if odd else None, "voxel_size": vol.voxel_size,
            "origin": list(vol.origin), "std_ddof": 0,
            "files": files,
            "parameters": {"n_samples": s_count, "sampler": sampler, "epsilon": epsilon,
                           "consistency": consistency, "tile": tile, "overlap": overlap,
                           "batch_size": batch_size, "seed": seed, "device": str(dev),
                           "interpolation": interpolation, "prior": prior,
                           "n_prior": n_prior},
        } | info
        (tmp / "family.json").write_text(json.dumps(_json_ready(meta), indent=2,
                                                          allow_nan=False))
    return out
