"""The stochastic restorer: a deterministic mean path plus a latent-field branch.

    sample = mu(x) + r(features of mu's decoder, z),   z ~ N(0, I) a latent field

- **Mean path** mu(x): exactly a `WAERestorer` (``self.mean``: same weights, same
  output, so a trained deterministic restorer can be loaded into it with
  `StochasticRestorer.from_restorer`). It keeps its squared-error Fourier loss, so the
  single restoration cannot get worse by adding the branch.
- **Stochastic branch** r(x, z): a small decoder that starts from the mean path's
  bottleneck features concatenated with the latent field's bottleneck level (c_z
  channels, one cell per 2**depth voxels), goes up level by level concatenating the
  mean path's decoder features there, the bottleneck field again (each cell repeated
  over its voxels, so z keeps its hold on the output) and, optionally, a per-level noise
  map
  (`StochasticConfig.level_noise` channels at that level's resolution), and ends in a
  1-channel head. Its blocks have no GroupNorm (`_LocalBlock`), so that overlapping
  tiles decode one global field alike. It sees the mean path's features through a
  stop-gradient by default (`detach_features`), so the score that trains it cannot
  bend the mean path; whether the sample's gradient reaches mu is `score_to_mean` (off
  by default: to be measured).
- z never depends on the input at inference: `draw_prior` takes shapes and a
  generator, nothing else; the posterior encoder (`cryowae.models.stochastic_posterior`)
  is a training-time branch for WAE latent matching.

Latent fields are lists of per-level tensors (B, m, C_l, Z_l, Y_l, X_l), m samples per
input; `field_spec` describes them and how a whole-tomogram field is cropped per tile
(`cryowae.models.stochastic_field`). Training uses the energy score of
`cryowae.training.scoring` on m >= 2 samples per input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cryowae.errors import CryowaeInputError, require_int
from cryowae.models.blocks import Up
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.models.stochastic_field import Field, FieldSpec
from cryowae.models.stochastic_posterior import InputSummary, PosteriorEncoder

#: what a block's first convolution and skip get from the mean path's features
Terms = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StochasticConfig:
    """Architecture of a `StochasticRestorer` (to be saved in checkpoints)."""

    restorer: RestorerConfig = field(default_factory=RestorerConfig)  # the mean path
    latent_channels: int = 8  # c_z: channels of the bottleneck field
    level_noise: int = 0  # noise-map channels per decoder level (0: bottleneck field only)
    branch_channels: int = 8  # branch width at full resolution, doubled per level
    detach_features: bool = True  # the branch sees stop-gradient mean-path features
    score_to_mean: bool = False  # the samples' gradient also reaches mu
    posterior: bool = True  # build the posterior encoder for WAE latent matching
    summary_dim: int = 4  # channels of the input summary s(x) matched jointly with z

    def __post_init__(self) -> None:
        for name in ("latent_channels", "branch_channels", "summary_dim", "level_noise"):
            require_int(getattr(self, name), f"stochastic {name}",
                        low=0 if name == "level_noise" else 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for YAML and checkpoints (the mean path's config nested)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StochasticConfig:
        """Inverse of `to_dict`; unknown keys raise `CryowaeInputError`."""
        d = dict(data)
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CryowaeInputError(f"unknown stochastic setting(s) {', '.join(unknown)}")
        d["restorer"] = RestorerConfig.from_dict(d.get("restorer", {}))
        return cls(**d)


@dataclass
class StochasticAux:
    """What `StochasticRestorer.forward` returns beside mean and samples.

    Attributes
    ----------
    code
        (B, latent_dim) the mean path's per-subtomogram code (FiLM conditioning).
    z
        The latent field used, per level (B, m, C_l, ...).
    bottleneck
        (B, C, z, y, x) the mean path's bottleneck features (detached), for
        `InputSummary`.
    """

    code: torch.Tensor
    z: Field
    bottleneck: torch.Tensor


class _LocalBlock(nn.Module):
    """Two 3x3x3 convolutions with SiLU and a residual connection, *without* GroupNorm:
    (B, C_in, Z, Y, X) -> (B, C_out, Z, Y, X). GroupNorm's statistics span the whole
    tile, so two overlapping tiles normalise the same field differently. Measured on
    128-voxel tiles offset by 64 (random weights, depth 2, bottleneck field only): the
    field-driven part of the samples disagreed by 0.006-0.007 of its RMS in the middle
    of the overlap (0.10-0.16 within 4 voxels of a tile edge) with these blocks, by
    0.04-0.05 (0.47-0.49) with GroupNorm in them; independent fields give 1.4-1.5."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.act = nn.SiLU()
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))) + self.skip(x))

    def feature_terms(self, f: torch.Tensor, start: int) -> Terms:
        """What input channels ``start : start + C_f`` (holding `f`) add to ``conv1``
        and ``skip`` (bias-free): convolutions are linear in their input channels, so
        these terms of a sample-independent input are computed once for all samples."""
        if not isinstance(self.skip, nn.Conv3d):
            raise ValueError("feature terms need a convolutional skip (C_in != C_out)")
        c = int(f.shape[1])
        return (F.conv3d(f, self.conv1.weight[:, start:start + c], None, padding=1),
                F.conv3d(f, self.skip.weight[:, start:start + c], None))

    def forward_with(self, own: torch.Tensor, start: int, width: int,
                     terms: Terms) -> torch.Tensor:
        """`forward` of the input whose channels ``start : start + width`` are those of
        `feature_terms` and the others `own` (in order): the same sums, the feature
        channels' part taken from `terms`."""
        w1, ws = (torch.cat([w[:, :start], w[:, start + width:]], dim=1)
                  for w in (self.conv1.weight, self.skip.weight))
        h = F.conv3d(own, w1, self.conv1.bias, padding=1) + terms[0]
        skip = F.conv3d(own, ws, self.skip.bias) + terms[1]
        return self.act(self.conv2(self.act(h)) + skip)


class _Branch(nn.Module):
    """r(features, z): bottleneck features + field -> up level by level -> 1 channel.

    The mean path's features enter every block through the block's first convolution
    and its skip; their part of those sums is the same for every sample of an input, so
    `shared` computes it once per input and `forward` adds it to each sample's (the
    convolutions of the samples' own channels: the upsampled state and the field)."""

    def __init__(self, feature_channels: Sequence[int], widths: Sequence[int],
                 latent_channels: int, level_noise: int) -> None:
        super().__init__()
        fc, w = list(feature_channels), list(widths)  # coarsest first
        self.inp = _LocalBlock(fc[0] + latent_channels, w[0])
        self.up = nn.ModuleList(Up(w[i], w[i + 1]) for i in range(len(w) - 1))
        self.blocks = nn.ModuleList(
            _LocalBlock(w[i + 1] + fc[i + 1] + latent_channels + level_noise, w[i + 1])
            for i in range(len(w) - 1))
        # default initialisation (not zero, not scaled down): the energy score's
        # gradient on the spread is proportional to the spread, so a branch that starts
        # (nearly) independent of z stays there; measured on a toy problem, a head scaled
        # by 0.1 and a field entering at the bottleneck only left the spread at 1e-4
        self.head = nn.Conv3d(w[-1], 1, 1)
        with torch.no_grad():
            self.head.bias.zero_()

    def shared(self, features: list[torch.Tensor]) -> list[Terms]:
        """Per block (coarsest first), the terms of the features (B, C_l, ...) of the
        mean path's decoder (`_LocalBlock.feature_terms`): the input's channels come
        first in the bottleneck block, after the upsampled state in the others."""
        terms = [self.inp.feature_terms(features[0], 0)]
        for i, block in enumerate(self.blocks):
            terms.append(block.feature_terms(features[i + 1], self.up[i].conv.out_channels))
        return terms

    def forward(self, shared: list[Terms], z: list[torch.Tensor],
                widths: Sequence[int], m: int = 1) -> torch.Tensor:
        """r of fields z per level (B m, C_l, ...), m samples per input, from the
        inputs' `shared` terms (B, ...) and the feature widths per level."""
        def terms(i: int) -> Terms:
            t = shared[i]
            return t if m == 1 else (t[0].repeat_interleave(m, dim=0),
                                     t[1].repeat_interleave(m, dim=0))

        h = self.inp.forward_with(z[0], 0, widths[0], terms(0))
        for i, (up, block) in enumerate(zip(self.up, self.blocks, strict=True)):
            # the bottleneck field again, repeated over each cell's voxels at this level
            coarse = z[0].repeat_interleave(2 ** (i + 1), 2).repeat_interleave(
                2 ** (i + 1), 3).repeat_interleave(2 ** (i + 1), 4)
            u = up(h)
            own = torch.cat([u, coarse] if len(z) == 1 else [u, coarse, z[i + 1]], dim=1)
            h = block.forward_with(own, int(u.shape[1]), widths[i + 1], terms(i + 1))
        return self.head(h)


class StochasticRestorer(nn.Module):
    """Mean path + latent-field branch (module docstring).

    ``StochasticRestorer(config, mean=restorer)`` composes the branch around an existing
    mean path at construction. ``forward(x, z=None, n_samples=2, generator=None) ->
    (mean, samples, aux)`` with x and mean (B, 1, Z, Y, X), samples (B, m, Z, Y, X) and
    aux a `StochasticAux`.
    """

    def __init__(self, config: StochasticConfig | None = None,
                 mean: WAERestorer | None = None) -> None:
        """`mean`: the mean path to wrap (the same module object: a trainer's restorer, a
        loaded model's), built of ``config.restorer``; None builds a fresh one."""
        super().__init__()
        cfg = config or StochasticConfig()
        self.config = cfg
        if mean is not None and mean.config != cfg.restorer:
            raise ValueError("the stochastic branch was built for another mean path")
        self.mean = WAERestorer(cfg.restorer) if mean is None else mean
        d = cfg.restorer.depth
        mean_ch = [cfg.restorer.channels * 2**i for i in reversed(range(d + 1))]
        widths = [cfg.branch_channels * 2**i for i in reversed(range(d + 1))]
        self.branch = _Branch(mean_ch, widths, cfg.latent_channels, cfg.level_noise)
        levels = d + 1 if cfg.level_noise else 1
        self.field_spec = FieldSpec(
            channels=(cfg.latent_channels,) + (cfg.level_noise,) * (levels - 1),
            strides=tuple(2 ** (d - i) for i in range(levels)))
        self.summary = InputSummary(mean_ch[0], cfg.summary_dim)
        self.posterior_encoder = (PosteriorEncoder(d, cfg.branch_channels,
                                                   cfg.latent_channels)
                                  if cfg.posterior else None)

    @classmethod
    def from_restorer(cls, restorer: WAERestorer,
                      config: StochasticConfig | None = None) -> StochasticRestorer:
        """A stochastic restorer whose mean path is a copy of a trained `restorer`
        (its config replaces ``config.restorer``)."""
        base = config or StochasticConfig()
        cfg = StochasticConfig(**{**asdict(base), "restorer": restorer.config})
        model = cls(cfg)
        model.mean.load_state_dict(restorer.state_dict())
        return model

    @property
    def multiple(self) -> int:
        """Spatial sizes and tile starts must be multiples of this (tile starts so that
        crops of a whole-tomogram field are exact, `stochastic_field`)."""
        return self.mean.multiple

    def sample_field_shape(self, tile_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per level (C, Z / s, Y / s, X / s) of the latent field of a tile."""
        return self.field_spec.shapes(tile_shape)

    def draw_prior(self, tile_shape: Sequence[int], batch: int = 1, n_samples: int = 1,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Field:
        """Prior fields for `batch` tiles, `n_samples` each: per level (B, m, C, ...).
        Depends on shapes and the generator only, never on an input."""
        f = self.field_spec.draw_tile(tile_shape, batch * n_samples, generator, device)
        return [v.reshape(batch, n_samples, *v.shape[1:]) for v in f]

    def mean_and_features(self, x: torch.Tensor
                          ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The mean path's restoration (B, 1, Z, Y, X), its decoder features per level
        (coarsest first: the bottleneck block's output, then each decoder block's,
        `WAERestorer.decode_features`) and its code (B, latent_dim)."""
        code, skips = self.mean.encode(x, sample=self.training)
        mean, feats = self.mean.decode_features(code, skips, x)
        return mean, feats, code

    def branch_terms(self, features: list[torch.Tensor]) -> list[Terms]:
        """The branch's terms of the mean path's features (B, C, ...) per level, the
        same for every sample (`_Branch.shared`): computed once, they serve any number
        of `decode_branch` calls on the same inputs."""
        return self.branch.shared([f.detach() if self.config.detach_features else f
                                   for f in features])

    def decode_branch(self, features: list[torch.Tensor], z: Field,
                      terms: list[Terms] | None = None) -> torch.Tensor:
        """r for every field: features per level (B, C, ...), z per level
        (B, m, C_l, ...) -> (B, m, Z, Y, X). `terms`: `branch_terms` of the same
        features, when already computed."""
        b, m = z[0].shape[:2]
        if len(z) != len(self.field_spec.channels):
            raise ValueError(f"the model takes {len(self.field_spec.channels)} field "
                             f"levels, got {len(z)}")
        terms = self.branch_terms(features) if terms is None else terms
        r = self.branch(terms, [v.reshape(b * m, *v.shape[2:]) for v in z],
                        [int(f.shape[1]) for f in features], m)
        return r.reshape(b, m, *r.shape[2:])

    def forward(self, x: torch.Tensor, z: Field | None = None, n_samples: int = 2,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, StochasticAux]:
        mean, feats, code = self.mean_and_features(x)
        if z is None:
            z = self.draw_prior(x.shape[-3:], x.shape[0], n_samples, generator, x.device)
        base = mean if self.config.score_to_mean else mean.detach()
        samples = base + self.decode_branch(feats, z)
        return mean, samples, StochasticAux(code=code, z=z, bottleneck=feats[0].detach())


__all__ = ["StochasticAux", "StochasticConfig", "StochasticRestorer"]
