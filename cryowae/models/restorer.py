"""The CryoGEN-II style restorer: encoder -> latent code z -> decoder.

A 3D U-Net whose bottleneck is summarised into one explicit latent code z per
subtomogram (dimension `latent_dim`). The code conditions every decoder level through
FiLM (feature-wise scale and shift), so decoding the same subtomogram with another code
changes the restoration: this is what posterior sampling exploits. The output is
residual: restored = skip(input) + decoder correction, the skip being a learnable
low-pass filter (default) or the identity. Inputs are globally normalised
subtomograms (B, 1, Z, Y, X) with Z, Y, X divisible by 2**depth.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from cryowae.errors import CryowaeInputError, require_int
from cryowae.models.blocks import ConvBlock, Down, Up

#: what the decoder's correction is added to (`RestorerConfig.skip`)
SKIPS = ("lowpass", "identity")
#: how the encoder turns features into codes (`RestorerConfig.encoder`)
ENCODERS = ("deterministic", "gaussian")


@dataclass(frozen=True)
class RestorerConfig:
    """Architecture of a `WAERestorer` (saved in every checkpoint), validated when made.

    Attributes
    ----------
    channels
        Channels at full resolution; doubled at each level.
    depth
        Number of down-sampling steps (tile sizes must be multiples of ``2**depth``).
    latent_dim
        Dimension of the code z.
    encoder
        ``"deterministic"`` or ``"gaussian"`` (z = mu + sigma * eps in training).
    skip
        What the decoder's correction is added to: ``"lowpass"`` (a learnable 3D filter
        of the input, initialised as a Gaussian of `skip_sigma` voxels) or
        ``"identity"`` (the input).
    skip_sigma
        Initial width of the low-pass skip filter, voxels.
    """

    channels: int = 16
    depth: int = 3
    latent_dim: int = 64
    encoder: str = "deterministic"
    skip: str = "lowpass"
    skip_sigma: float = 1.0

    def __post_init__(self) -> None:
        for name in ("channels", "depth", "latent_dim"):
            require_int(getattr(self, name), f"restorer {name}")
        if self.encoder not in ENCODERS:
            raise CryowaeInputError(f"unknown encoder {self.encoder!r} "
                                    f"({' or '.join(ENCODERS)})")
        if self.skip not in SKIPS:
            raise CryowaeInputError(f"unknown skip {self.skip!r} ({' or '.join(SKIPS)})")
        if not float(self.skip_sigma) > 0:
            raise CryowaeInputError(f"skip_sigma must be positive, got {self.skip_sigma!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RestorerConfig:
        """Inverse of `to_dict`; unknown keys raise `CryowaeInputError`."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise CryowaeInputError(f"unknown restorer setting(s) {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for YAML and checkpoints."""
        return asdict(self)


class Encoding(NamedTuple):
    """What the encoder computes for a batch x of shape (B, 1, Z, Y, X).

    stats
        Output of the latent head: the codes (B, latent_dim), or for a Gaussian encoder
        their mean and log-variance (B, 2 * latent_dim).
    skips
        Features of each level for the decoder, full resolution first; the last one is
        the bottleneck (B, C, Z / 2**depth, Y / 2**depth, X / 2**depth).
    pooled
        Mean and max of the bottleneck over space (B, 2 C): the latent head's input,
        which the trainer banks (`WAERestorer.codes_from_pooled`).
    """

    stats: torch.Tensor
    skips: list[torch.Tensor]
    pooled: torch.Tensor


class RestorerOutput(NamedTuple):
    """`WAERestorer.forward(x, with_features=True)`: what training needs of one pass.

    restored
        The restoration (B, 1, Z, Y, X).
    z
        The codes (B, latent_dim) (sampled for a Gaussian encoder in training mode).
    pooled
        The latent head's input (B, 2 C), see `Encoding`.
    features
        The decoder's features per level, coarsest first: the bottleneck block's
        output, then each decoder block's (what the family branch reads).
    """

    restored: torch.Tensor
    z: torch.Tensor
    pooled: torch.Tensor
    features: list[torch.Tensor]


class WAERestorer(nn.Module):
    """3D convolutional Wasserstein-autoencoder restorer.

    ``forward(x) -> (restored, z)`` with x, restored of shape (B, 1, Z, Y, X) and z of
    shape (B, latent_dim); ``forward(x, with_features=True)`` returns a
    `RestorerOutput` that adds what training needs (pooled bottleneck features, the
    decoder's features per level). `encode` and `decode` expose the two halves so a caller can
    decode a subtomogram with codes other than its own.
    """

    def __init__(self, config: RestorerConfig | None = None) -> None:
        super().__init__()
        cfg = config or RestorerConfig()
        self.config = cfg
        ch = [cfg.channels * 2**i for i in range(cfg.depth + 1)]
        self.stem = ConvBlock(1, ch[0])
        self.enc = nn.ModuleList(ConvBlock(ch[i + 1], ch[i + 1]) for i in range(cfg.depth))
        self.down = nn.ModuleList(Down(ch[i], ch[i + 1]) for i in range(cfg.depth))
        n_out = 2 * cfg.latent_dim if cfg.encoder == "gaussian" else cfg.latent_dim
        # LayerNorm on the pooled features: the scale of z is set by this head alone, not
        # by the drift of the encoder's feature magnitudes that reconstruction causes
        self.to_latent = nn.Sequential(nn.LayerNorm(2 * ch[-1]), nn.Linear(2 * ch[-1], ch[-1]),
                                       nn.SiLU(), nn.Linear(ch[-1], n_out))
        self.up = nn.ModuleList(Up(ch[i + 1], ch[i]) for i in reversed(range(cfg.depth)))
        self.dec = nn.ModuleList(ConvBlock(2 * ch[i], ch[i]) for i in reversed(range(cfg.depth)))
        self.mid = ConvBlock(ch[-1], ch[-1])
        # FiLM generators: z -> (gamma, beta) for the bottleneck and each decoder level
        film_channels = [ch[-1]] + [ch[i] for i in reversed(range(cfg.depth))]
        self.film = nn.ModuleList(nn.Linear(cfg.latent_dim, 2 * c) for c in film_channels)
        for lin in self.film:  # start as the identity modulation
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.skip_filter = _gaussian_filter(cfg.skip_sigma) if cfg.skip == "lowpass" else None
        self.head = nn.Conv3d(ch[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2**self.config.depth

    def encode_features(self, x: torch.Tensor) -> Encoding:
        """Encoder pass of x (B, 1, Z, Y, X): latent statistics, skip features and the
        pooled bottleneck features (`Encoding`)."""
        h = self.stem(x)
        skips = [h]
        for down, block in zip(self.down, self.enc, strict=True):
            h = block(down(h))
            skips.append(h)
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        return Encoding(self.to_latent(pooled), skips, pooled)

    def codes_from_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Latent codes (the mean, for a Gaussian encoder) of pooled bottleneck features
        (N, 2 * bottleneck channels), through the current latent head. The trainer keeps
        a bank of pooled features and maps it with this, so banked codes never go stale
        as the head learns."""
        stats = self.to_latent(pooled)
        if self.config.encoder == "gaussian":
            return stats.chunk(2, dim=1)[0]
        return stats

    @torch.no_grad()
    def standardise_codes(self, mean: torch.Tensor, std: torch.Tensor,
                          sigma: float = 1.0) -> None:
        """Rescale the last layer of the latent head so that codes with per-dimension
        `mean` and `std` (latent_dim,) come out with mean 0 and standard deviation
        `sigma`: a data-dependent initialisation (as in weight normalisation or Glow's
        ActNorm). A freshly initialised head gives codes with a spread of about 0.05 (the
        pooled features differ little between subtomograms), a near-point cloud on which
        the IMQ-MMD's repulsion is weak; started on the prior's first two moments, the
        penalty only has to keep the codes there. For a Gaussian encoder the mean half
        is rescaled and the log-variance half is left alone."""
        last = self.to_latent[-1]
        d = self.latent_dim
        scale = sigma / std.to(last.weight).clamp_min(1e-6)
        last.weight[:d] *= scale[:, None]
        last.bias[:d] = (last.bias[:d] - mean.to(last.bias)) * scale

    def encode(self, x: torch.Tensor, sample: bool = False) -> tuple[torch.Tensor,
                                                                      list[torch.Tensor]]:
        """Latent codes z (B, latent_dim) and the skip features for `decode`.

        A Gaussian encoder returns its mean unless `sample` is set.
        """
        enc = self.encode_features(x)
        return self._codes(enc.stats, sample), enc.skips

    def _codes(self, stats: torch.Tensor, sample: bool) -> torch.Tensor:
        if self.config.encoder == "gaussian":
            mu, logvar = stats.chunk(2, dim=1)
            if sample:
                return mu + torch.randn_like(mu) * (0.5 * logvar.clamp(-10, 4)).exp()
            return mu
        return stats

    def decode(self, z: torch.Tensor, skips: list[torch.Tensor],
               x: torch.Tensor) -> torch.Tensor:
        """Restore `x` (B, 1, Z, Y, X) from its skip features, conditioned on codes z."""
        return self.decode_features(z, skips, x)[0]

    def decode_features(self, z: torch.Tensor, skips: list[torch.Tensor], x: torch.Tensor
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`decode`, and the decoder's features per level (coarsest first)."""
        h = self.mid(skips[-1], self.film[0](z))
        features = [h]
        for i, (up, block) in enumerate(zip(self.up, self.dec, strict=True)):
            skip = skips[-2 - i]
            h = block(torch.cat([up(h), skip], dim=1), self.film[i + 1](z))
            features.append(h)
        # the output is mostly the low-pass of the input: under bf16 autocast the skip,
        # the head and their sum run in float32, so only the decoder's correction
        # carries bf16 rounding (float32 runs are unchanged: no autocast to turn off)
        with _float32_region(x.device.type):
            x, h = x.float(), h.float()
            base = x if self.skip_filter is None else self.skip_filter(x)
            return base + self.head(h), features

    def forward(self, x: torch.Tensor, with_features: bool = False,
                z_probe: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor] | RestorerOutput:
        """Restore x (B, 1, Z, Y, X): ``(restored, z)``, or with `with_features` a
        `RestorerOutput` (restored, z, pooled, features) for the trainer. A Gaussian
        encoder samples z in training mode and uses its mean in eval mode.

        `z_probe`: a zero leaf tensor (B, latent_dim) of the caller's, added to z where
        the decoder reads it (values unchanged); after a backward pass its ``.grad`` is
        the gradient the decoder sent to z, i.e. the reconstruction's alone, apart from
        what a penalty on z adds (the trainer's term balancer compares the two)."""
        enc = self.encode_features(x)
        z = self._codes(enc.stats, sample=self.training)
        z_dec = z if z_probe is None else z + z_probe
        if not with_features:
            return self.decode(z_dec, enc.skips, x), z
        restored, features = self.decode_features(z_dec, enc.skips, x)
        return RestorerOutput(restored, z, enc.pooled, features)


def _float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast turned off on `device_type` where it is on, else a no-op context."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _gaussian_filter(sigma: float) -> nn.Conv3d:
    """A learnable 1-channel 3D filter initialised as a normalised Gaussian (sigma in
    voxels; the kernel spans +-3 sigma). At the noise levels of tomograms the plain
    identity skip makes the untrained restorer return the noise; starting from a
    low-pass lets the decoder learn a correction rather than to cancel its input."""
    r = max(1, int(math.ceil(3 * sigma)))
    conv = nn.Conv3d(1, 1, 2 * r + 1, padding=r, padding_mode="replicate", bias=False)
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-x**2 / (2 * sigma**2))
    k = g[:, None, None] * g[None, :, None] * g[None, None, :]
    with torch.no_grad():
        conv.weight.copy_((k / k.sum())[None, None])
    return conv
