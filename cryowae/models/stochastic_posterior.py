"""WAE latent matching for the stochastic restorer: posterior encoder and joint matching.

Training decodes the input with prior fields z ~ N(0, I) (scored by the energy score),
but also with a field drawn from a posterior encoder q(z | x, y_miss) that sees the
wedged input x and the part of the target the input lacks, ``y_miss = F^-1(m_target (1 -
m_input) F(y))`` (`missing_part`). That reconstruction branch teaches the decoder to
use z for what the input cannot tell. For prior draws to be valid at inference, the
aggregate of q must equal the prior *and be independent of the input*. So the matched
codes are joint vectors, one per bottleneck cell,

    q side: [ s(x), z_q ]        prior side: [ s(x), eps ],  eps ~ N(0, I)

with s(x) a stop-gradient summary of the input at that cell (`InputSummary`: a fixed
random projection of the mean path's bottleneck features, standardised over the batch).
Both sides share s(x), so the divergence (any of `cryowae.divergences.registry`) is
zero only when z_q has the prior's law *given* s(x): matching the joint to the product
of the summary's law and the prior forbids z_q to depend on s(x). The codes are never
re-centred, so a drift of their mean shows in the divergence and in `code_moments`.
"""

from __future__ import annotations

import torch
from torch import nn

from cryowae.divergences.registry import LatentDivergence
from cryowae.models.blocks import ConvBlock, Down

_DIMS = (-3, -2, -1)


def missing_part(target: torch.Tensor, target_measured: torch.Tensor,
                 input_measured: torch.Tensor) -> torch.Tensor:
    """The part of `target` (B, 1, Z, Y, X) that was measured in the target but not in
    the input: inverse FFT of its spectrum times ``m_target (1 - m_input)`` (rfft masks,
    (B, Z, Y, X//2+1) and (Z, Y, X//2+1) as in `TrainingBatch`). A rotated mask is not
    exactly Friedel symmetric on the kx = 0 (and Nyquist) planes; there the inverse FFT
    keeps a coefficient whose mate is in the region."""
    region = target_measured * (1.0 - input_measured)
    spec = torch.fft.rfftn(target[:, 0].float(), dim=_DIMS) * region
    return torch.fft.irfftn(spec, s=tuple(target.shape[-3:]), dim=_DIMS)[:, None]


class PosteriorEncoder(nn.Module):
    """q(z | x, y_miss): a conv encoder of the two channels (x, y_miss) down to the
    bottleneck's resolution, giving a diagonal Gaussian per cell.

    ``forward(x, missing) -> (mu, logvar)``, both (B, latent_channels, Z/s, Y/s, X/s)
    with s = 2**depth. The output layer starts at zero: q starts as the prior.
    """

    def __init__(self, depth: int, channels: int, latent_channels: int) -> None:
        super().__init__()
        ch = [channels * 2**i for i in range(depth + 1)]
        self.stem = ConvBlock(2, ch[0])
        self.down = nn.ModuleList(Down(ch[i], ch[i + 1]) for i in range(depth))
        self.blocks = nn.ModuleList(ConvBlock(ch[i + 1], ch[i + 1]) for i in range(depth))
        self.out = nn.Conv3d(ch[-1], 2 * latent_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, missing: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(torch.cat([x, missing], dim=1))
        for down, block in zip(self.down, self.blocks, strict=True):
            h = block(down(h))
        mu, logvar = self.out(h).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 4.0)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """A reparameterised draw mu + exp(logvar / 2) eps."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * (0.5 * logvar).exp()


class InputSummary(nn.Module):
    """A stop-gradient summary s(x) per bottleneck cell: the mean path's bottleneck
    features (B, C, z, y, x) through a fixed random projection to `dim` channels
    (a buffer, saved with the model, never trained: it cannot learn to hide anything),
    standardised per channel over the batch and cells."""

    def __init__(self, in_channels: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(int(seed))
        proj = torch.randn(dim, in_channels, generator=g) / in_channels**0.5
        self.register_buffer("projection", proj)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        s = torch.einsum("dc,bczyx->bdzyx", self.projection, features.detach().float())
        mean = s.mean(dim=(0, 2, 3, 4), keepdim=True)
        std = s.std(dim=(0, 2, 3, 4), keepdim=True).clamp_min(1e-6)
        return (s - mean) / std


def joint_codes(summary: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """One vector per bottleneck cell: [s(x), z] from (B, Cs, z, y, x) and
    (B, Cz, z, y, x) -> (B * cells, Cs + Cz)."""
    v = torch.cat([summary.detach(), z], dim=1)
    return v.flatten(2).transpose(1, 2).reshape(-1, v.shape[1])


def latent_matching(divergence: LatentDivergence, summary: torch.Tensor,
                    z_q: torch.Tensor, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """The divergence between the joint codes [s(x), z_q] and [s(x), eps] (module
    docstring). `divergence` must be built for dimension Cs + Cz."""
    eps = torch.randn(z_q.shape, generator=generator, device=z_q.device, dtype=z_q.dtype)
    return divergence(joint_codes(summary, z_q), joint_codes(summary, eps))


@torch.no_grad()
def matching_report(divergence: LatentDivergence, summary: torch.Tensor,
                    z_q: torch.Tensor, generator: torch.Generator | None = None,
                    repeats: int = 4) -> dict[str, float]:
    """The matching figure and its null band for a log.

    ``divergence``: fresh codes against a prior draw (joint, as trained). ``null``: the
    root-mean-square, over `repeats` pairs, of the divergence between two prior draws of
    the same size: the size a perfect match shows (an unbiased MMD fluctuates about 0
    and can be negative, so the band is a scale, not a value). A match holds when
    ``|divergence| <= 3 null``. Plus the codes' uncentred moments (`code_moments`).
    """
    def prior() -> torch.Tensor:
        return torch.randn(z_q.shape, generator=generator, device=z_q.device,
                           dtype=z_q.dtype)

    value = float(divergence(joint_codes(summary, z_q), joint_codes(summary, prior())))
    nulls = [float(divergence(joint_codes(summary, prior()), joint_codes(summary, prior())))
             for _ in range(max(1, int(repeats)))]
    out = {"divergence": value, "null": float(sum(v * v for v in nulls) / len(nulls)) ** 0.5}
    out.update(code_moments(z_q))
    return out


def code_moments(z: torch.Tensor) -> dict[str, float]:
    """Uncentred moments of codes (B, C, ...): the norm of the per-channel mean (0 for
    the prior) and the mean per-channel standard deviation (1 for the prior)."""
    flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).float()
    return {"code_mean_norm": float(flat.mean(dim=1).norm()),
            "code_std": float(flat.std(dim=1).mean())}


__all__ = ["InputSummary", "PosteriorEncoder", "code_moments", "joint_codes",
           "latent_matching", "matching_report", "missing_part"]
