"""Where the samples of a family come from: per-sample tile functions for the tile engine.

Every sampler gives, for a group of sample indices, a `cryowae.tiling.engine.TileFn`
that returns one output channel per sample of the group, (B, G, tz, ty, tx), so that a
whole group of samples streams out of one pass of the engine (`run_tiles(...,
channels=G)`).

* ``prior`` (default): a stochastic restorer (`cryowae.models.stochastic`) decodes
  each tile with the mean path's features and a latent field drawn from the prior.
  Sample s draws ONE field over the whole tile plan's padded grid (`FieldSpec.draw`,
  seeded by ``(seed, s)`` through `numpy.random.SeedSequence`, drawn on the CPU so that
  the devices agree), and each tile decodes its crop of it (`FieldSpec.crop`): two
  overlapping tiles read the same latent cells, so they decode the same sample and the
  blending averages nothing independent. Tile starts are multiples of the model's
  `multiple` (`aligned_plan`). The mean path runs once per tile for the whole group.
* ``rotations``: test-time rotations of a deterministic restorer. Sample s restores
  the tiles rotated by the s-th of the cube's 24 proper rotations (exact; identity
  first), with the tomogram's missing wedge removed again from the rotated input as in
  training, and rotates the result back. At most 24 samples; cubic tiles.
* ``ensemble``: sample s is the restoration by the s-th of several models.

Removed (issue 11): the entropic-OT and Gaussian code samplers. They varied the
per-subtomogram code of a deterministic restorer, which the decoder had learnt to
ignore (families of std about 0.005x the tomogram's); no measurement showed them to
help, and a code per tile breaks the coherence of a sample across tiles.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.models.stochastic_field import aligned_starts
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import apply_fourier_mask
from cryowae.precision import ComputeSettings, autocast, prepare
from cryowae.tiling.engine import TileFn, TileRef
from cryowae.tiling.plan import AxisPlan, TilePlan
from cryowae.tiling.settings import TileSettings

SAMPLERS = ("prior", "rotations", "ensemble")
#: samples decoded per branch call on the CPU (all of a group on CUDA). The branch runs
#: on the group's features repeated per sample, so one call of G samples holds G times
#: the activations: measured on 64 x 192 x 192 (8 samples, 96^3 tiles, 4 per batch, one
#: thread), all 8 at once peaked at 13.9 GB RSS and spent 97 s of 175 s CPU in the
#: kernel (page faults of freshly mapped activations)
CPU_BRANCH_SAMPLES = 1
DEFAULT_SAMPLER = "prior"


# ------------------------------------------------------------------------- plans
def aligned_plan(settings: TileSettings, shape: Sequence[int], multiple: int,
                 cubic: bool = False) -> TilePlan:
    """The tile plan of a (Z, Y, X) volume whose tile starts (padded coordinates) are
    multiples of `multiple`, as `FieldSpec.crop` needs.

    Each axis is padded by reflection as `cryowae.tiling.plan.plan_axis` pads it
    (``overlap // 2`` in front); the starts come from `aligned_starts`, and the padding
    behind grows until the last tile fits. With `cubic`, axes that fit in one shorter
    tile get the longest tile edge and more padding (rotations need cubic tiles).
    """
    shp = tuple(int(s) for s in shape)
    base = settings.plan(shp, multiple)  # validates the shape and rounds the tile
    m = max(1, int(multiple))
    tile = settings.resolved_tile(m)
    axes = []
    for size, a in zip(shp, base.axes, strict=True):
        if len(a.starts) == 1:
            axes.append(a)
            continue
        starts = aligned_starts(a.pad_before + size + a.pad_before, tile,
                                settings.overlap, m)
        extent = max(a.pad_before + size + a.pad_before, starts[-1] + tile)
        axes.append(AxisPlan(size, tile, a.pad_before, extent - size - a.pad_before,
                             tuple(starts)))
    if cubic and len({a.tile for a in axes}) > 1:
        c = max(a.tile for a in axes)
        axes = [a if a.tile == c else AxisPlan(a.size, c, (c - a.size) // 2,
                                               c - a.size - (c - a.size) // 2, (0,))
                for a in axes]
    return TilePlan(tuple(axes), base.window)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- rotations
def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations of the cube as signed permutation matrices acting on
    (z, y, x), identity first. Exact on cubic tiles (no interpolation)."""
    import itertools

    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3), dtype=np.int64)
            for i, (p, s) in enumerate(zip(perm, signs, strict=True)):
                r[i, p] = s
            if round(np.linalg.det(r)) == 1:
                mats.append(r)
    mats.sort(key=lambda r: (not np.array_equal(r, np.eye(3, dtype=np.int64)),))
    return mats


def rotate_cube(x: torch.Tensor, r: np.ndarray, inverse: bool = False) -> torch.Tensor:
    """Apply the signed permutation `r` to the last three axes of `x`:
    out(p) = x(R^T p) (or its inverse), exactly."""
    r = r.T if inverse else r
    lead = x.ndim - 3
    # out[p] = x[R^T p]: output axis i reads input axis perm[i] (with its sign)
    perm = [int(np.nonzero(r[i])[0][0]) for i in range(3)]
    signs = [int(r[i, perm[i]]) for i in range(3)]
    y = x.permute(*range(lead), *[lead + p for p in perm])
    flip = [lead + i for i in range(3) if signs[i] < 0]
    return y.flip(flip) if flip else y


# ------------------------------------------------------------------------- samplers
def sample_generator(seed: int, sample: int) -> torch.Generator:
    """The CPU generator of sample `sample` of a family seeded `seed`: independent
    streams per (seed, sample), the same on every run and for any family size."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(sample)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass
class FieldSampler:
    """``prior``: latent fields of a stochastic restorer over the whole padded grid."""

    stochastic: Any  # a StochasticRestorer in eval mode on `device`
    plan: TilePlan
    seed: int
    device: torch.device
    amp: bool | None = None  # bf16 autocast (cryowae.precision.amp_active)
    #: the branch's weights in channels_last_3d (`SamplerSettings.channels_last`)
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.channels_last:
            prepare(self.stochastic.branch, ComputeSettings(channels_last=True))

    def fields(self, sample: int) -> list[torch.Tensor]:
        """Sample `sample`'s field per level (1, C, cells...) on the device."""
        f = self.stochastic.field_spec.draw(self.plan.padded_shape, 1,
                                            sample_generator(self.seed, sample))
        return [v.to(self.device) for v in f]

    def tile_fn(self, group: Sequence[int], with_mean: bool = False) -> TileFn:
        """The group's tile function; `with_mean`: the mean path's restoration as an
        extra first channel (the family's centre, from the same pass)."""
        fields = [self.fields(s) for s in group]
        spec, tile = self.stochastic.field_spec, self.plan.tile
        model = self.stochastic

        def fn(x: torch.Tensor, refs: Sequence[TileRef]) -> torch.Tensor:
            crops = [[spec.crop(f, r.start, tile) for f in fields] for r in refs]
            z = [torch.stack([torch.cat([c[s][lev] for s in range(len(fields))])
                              for c in crops]) for lev in range(len(fields[0]))]
            with torch.inference_mode(), autocast(self.device, self.amp):
                mean, feats, _ = model.mean_and_features(x)
                z = [v.to(feats[0].dtype) for v in z]
                step = len(fields) if self.device.type == "cuda" else CPU_BRANCH_SAMPLES
                terms = model.branch_terms(feats)  # once for all samples of the group
                # the channels written into one tensor: no list of them, no copies
                first = int(with_mean)
                out = torch.empty((mean.shape[0], first + len(fields), *mean.shape[2:]),
                                  dtype=mean.dtype, device=mean.device)
                if with_mean:
                    out[:, :1] = mean
                for i in range(0, len(fields), step):
                    r = model.decode_branch(feats, [v[:, i:i + step] for v in z], terms)
                    out[:, first + i:first + i + r.shape[1]] = mean + r
                return out

        return fn


@dataclass
class RotationSampler:
    """``rotations``: test-time rotations of one deterministic restorer."""

    model: torch.nn.Module
    plan: TilePlan
    geometry: TiltGeometry
    device: torch.device
    amp: bool | None = None  # bf16 autocast (cryowae.precision.amp_active)

    def tile_fn(self, group: Sequence[int]) -> TileFn:
        rots = cube_rotations()
        mask = self.geometry.wedge_mask(self.plan.tile, rfft=True, device=self.device)
        model = self.model

        def one(x: torch.Tensor, s: int) -> torch.Tensor:
            if s == 0:
                return model(x)[0]
            xr = apply_fourier_mask(rotate_cube(x, rots[s]), mask)
            return rotate_cube(model(xr)[0], rots[s], inverse=True)

        def fn(x: torch.Tensor, refs: Sequence[TileRef]) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device, self.amp):
                return torch.cat([one(x, s).float() for s in group], dim=1)

        return fn


@dataclass
class EnsembleSampler:
    """``ensemble``: one sample per model (all on `device`)."""

    models: list[torch.nn.Module]
    device: torch.device
    amp: bool | None = None  # bf16 autocast (cryowae.precision.amp_active)

    def tile_fn(self, group: Sequence[int]) -> TileFn:
        def fn(x: torch.Tensor, refs: Sequence[TileRef]) -> torch.Tensor:
            with torch.inference_mode(), autocast(self.device, self.amp):
                return torch.cat([self.models[s](x)[0].float() for s in group], dim=1)

        return fn


def resolve_sampler(requested: str, restorer: Any) -> tuple[str, str | None]:
    """The sampler for `requested`, which may be ``auto``: ``prior`` when the model has
    a stochastic branch, else ``rotations``; returns (sampler, a note to show or None)."""
    if requested != "auto":
        return requested, None
    if getattr(restorer, "stochastic", None) is not None:
        return "prior", None
    return "rotations", ("the model has no stochastic branch: sampling test-time "
                         "rotations instead of prior draws")


def check_sampler(sampler: str, n_samples: int, n_models: int, has_branch: bool) -> int:
    """Validate the sampler's choice and return the family size (raises
    `CryowaeInputError` with the fix)."""
    if sampler not in SAMPLERS:
        raise CryowaeInputError(f"unknown sampler {sampler!r}: choose from "
                                f"{', '.join(SAMPLERS)}")
    if sampler != "ensemble" and n_models > 1:
        raise CryowaeInputError(f"several models were given: use --sampler ensemble "
                                f"(not {sampler})")
    if sampler == "ensemble":
        if n_models < 2:
            raise CryowaeInputError("--sampler ensemble needs at least two models")
        return n_models
    n = int(n_samples)
    if n < 1:
        raise CryowaeInputError(f"--n must be positive, got {n_samples}")
    if sampler == "rotations" and n > 24:
        raise CryowaeInputError(f"--sampler rotations gives at most 24 distinct samples "
                                f"(the cube's rotations), asked for {n}")
    if sampler == "prior" and not has_branch:
        raise CryowaeInputError(
            "the model has no stochastic branch, so it cannot draw posterior samples: "
            "train it with the posterior-family branch, or use --sampler rotations "
            "(test-time rotations) or --sampler ensemble (several models)")
    return n


__all__ = [
    "DEFAULT_SAMPLER", "SAMPLERS", "EnsembleSampler", "FieldSampler", "RotationSampler",
    "aligned_plan", "check_sampler", "cube_rotations", "resolve_sampler", "rotate_cube",
    "sample_generator",
]
