"""WAE-GAN latent discriminator: THE UNSTABLE BASELINE we compare against.

An MLP ``D: z -> logit`` is trained to tell prior samples (label 1) from encoder codes
(label 0); the encoder is penalised with the non-saturating loss ``-log sigmoid(D(z_q))``
(the WAE paper's ``loss_Qz_trick``). This reintroduces the minimax instability that the
closed-form divergences (MMD, Sinkhorn, sliced) avoid: when the discriminator lags the
moving aggregated posterior, the gradient handed to the encoder is biased, and the
penalty's value says little about how far q_Z is from the prior (at an optimal
discriminator and q_Z = p_Z it is log 2, not 0). Use it only as a baseline.

The discriminator has its own Adam optimiser; call `discriminator_step` once per
training step (before or after the encoder's step) with detached codes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from cryowae.errors import CryowaeInputError


class LatentDiscriminator(nn.Module):
    """MLP on codes (N, dim) -> logits (N,); ``layers`` hidden ReLU layers of ``hidden``.

    The WAE paper's z-adversary used 4 x 512 hidden units.
    """

    def __init__(self, dim: int, hidden: int = 512, layers: int = 4) -> None:
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1 or int(layers) < 1:
            raise CryowaeInputError(
                f"discriminator needs positive dim/hidden/layers, got {dim}/{hidden}/{layers}"
            )
        mods: list[nn.Module] = []
        width = int(dim)
        for _ in range(int(layers)):
            mods += [nn.Linear(width, int(hidden)), nn.ReLU()]
            width = int(hidden)
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)


class AdversarialDivergence(nn.Module):
    """WAE-GAN matching penalty (unstable baseline).

    Args:
        dim: code dimension.
        scale: the prior's sigma; codes are divided by it before the discriminator.
        hidden, layers: discriminator MLP size.
        lr: discriminator learning rate (Adam, betas (0.5, 0.999) as in the WAE paper).
        seed: seed for the discriminator's initial weights (reproducible baselines).
    """

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        hidden: int = 512,
        layers: int = 4,
        lr: float = 5e-4,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.scale = float(scale)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                self.discriminator = LatentDiscriminator(dim, hidden, layers)
        else:
            self.discriminator = LatentDiscriminator(dim, hidden, layers)
        self.optimizer = torch.optim.Adam(
            self.discriminator.parameters(), lr=float(lr), betas=(0.5, 0.999)
        )

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """Discriminator logits (N,) for codes (N, dim)."""
        return self.discriminator(z / self.scale)

    def discriminator_loss(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        """BCE of D on prior samples z_p (label 1) and detached codes z_q (label 0)."""
        lp = self.logits(z_p.detach())
        lq = self.logits(z_q.detach())
        return F.binary_cross_entropy_with_logits(
            lp, torch.ones_like(lp)
        ) + F.binary_cross_entropy_with_logits(lq, torch.zeros_like(lq))

    def encoder_penalty(self, z_q: torch.Tensor) -> torch.Tensor:
        """Non-saturating penalty ``mean(-log sigmoid(D(z_q)))``; gradients reach z_q only.

        The discriminator is evaluated with detached parameters, so the encoder's
        backward pass leaves the discriminator's ``.grad`` untouched.
        """
        params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        lq = functional_call(self.discriminator, params, (z_q / self.scale,))
        return F.binary_cross_entropy_with_logits(lq, torch.ones_like(lq))

    def discriminator_step(self, z_q: torch.Tensor, z_p: torch.Tensor) -> float:
        """One Adam step of the discriminator on (codes, prior sample); returns its loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = self.discriminator_loss(z_q, z_p)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        """The encoder's penalty (``z_p`` is unused here; see `discriminator_step`)."""
        return self.encoder_penalty(z_q)
