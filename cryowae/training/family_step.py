"""The posterior-family part of a training step (`TrainConfig.family`).

`FamilyTrainer` owns the `StochasticRestorer` around the trainer's mean path, its own
random generator, the target-noise spectrum, the joint matching divergence and the
balancers of its terms. Each step, given the mean path's forward pass of the batch
(restoration and decoder features, `RestorerOutput`, so the mean path runs once and
unchanged), it adds

- the energy score (`cryowae.training.scoring.family_score`, variant ``score``) of m
  samples ``mean + r(features, z)``, z ~ prior, with simulated target noise of the
  data's own power per shell (`cryowae.training.noise.target_noise`), against the
  (other-half) target, with the Fourier weights of the mean path's loss
  (`fourier_weights`: measured / wedge of the rotated target); m = 1 is the ablation:
  the squared-error loss of the one sample;
- with ``posterior_matching``: the reconstruction branch, ``mean + r(features, z_q)``
  with z_q ~ q(z | input, the target's missing part), under the mean path's loss, and
  the joint matching divergence of [s(x), z_q] to [s(x), eps]
  (`cryowae.models.stochastic_posterior.latent_matching`).

Nothing of this reaches the mean path: the branch sees detached features and the
detached mean, and the trainer clips the two parameter sets apart, so the mean path
trains bit for bit as with the family off (tested). Weights are scale-free: each term
is balanced by a `TermBalancer`: the score and the posterior reconstruction against the
mean path's reconstruction value, the matching divergence against the posterior
reconstruction by the gradients both send to z_q ("at least as strong").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from cryowae.divergences import GaussianPrior, LatentDivergence, build_divergence
from cryowae.models.restorer import WAERestorer
from cryowae.models.stochastic import StochasticRestorer
from cryowae.models.stochastic_posterior import (
    PosteriorEncoder,
    joint_codes,
    latent_matching,
    missing_part,
)
from cryowae.training.augment import TrainingBatch
from cryowae.training.config import TrainConfig
from cryowae.training.loss import TermBalancer, fourier_weights, masked_fourier_loss
from cryowae.training.noise import NoiseSpectrum, draw_noise
from cryowae.training.scoring import family_score

#: seed offsets: the branch's initialisation and the family's random stream are apart
#: from everything the mean path draws
_INIT_SEED, _GEN_SEED = 4241, 6007


def matching_divergence(cfg: TrainConfig, dim: int) -> LatentDivergence:
    """The family's joint matching divergence for codes of dimension `dim`."""
    name = cfg.family.matching_divergence
    options: dict[str, Any] = {
        "mmd": {}, "sinkhorn": {"blur": cfg.blur, "scaling": cfg.scaling,
                                "p": cfg.sinkhorn_p},
        "sliced": {"n_projections": cfg.n_projections, "seed": cfg.seed},
        "adversarial": {"seed": cfg.seed}}[name]
    return build_divergence(name, dim, GaussianPrior(dim), **options)


def sample_spread(samples: torch.Tensor, input_measured: torch.Tensor
                  ) -> tuple[float, float]:
    """Fourier energy of sample differences per coefficient (ortho FFT, normalised
    units squared), averaged over pairs, in the region the input measured and in its
    missing wedge: samples (B, m, Z, Y, X), m >= 2; input_measured (Z, Y, X // 2 + 1)."""
    d = samples[:, 1:] - samples[:, :1]
    power = torch.fft.rfftn(d.float(), dim=(-3, -2, -1), norm="ortho").abs().square()
    power = power.mean(dim=(0, 1)) / 2  # E|F(s_i - s_j)|^2 / 2: the per-sample variance
    m = input_measured.to(power.dtype)
    return (float((power * m).sum() / m.sum().clamp_min(1)),
            float((power * (1 - m)).sum() / (1 - m).sum().clamp_min(1)))


def _grad(value: torch.Tensor, wrt: torch.Tensor) -> float:
    """Norm of d value / d wrt (0 where it does not depend on it)."""
    (g,) = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
    return 0.0 if g is None else float(g.norm())


class FamilyLoss(NamedTuple):
    """`FamilyTrainer.loss` of one step: the loss (its graph reaches the branch only),
    the figures for the log, and the joint codes [s(x), z_q] (detached) that the WAE-GAN
    critic of an adversarial matching divergence trains on in `after_step` (None
    without posterior matching)."""

    loss: torch.Tensor
    figures: dict[str, float]
    joint: torch.Tensor | None


class FamilyTrainer:
    """The family branch of one run (module docstring).

    Parameters
    ----------
    cfg
        The run's settings (``cfg.family`` enabled).
    mean
        The trainer's mean path: the branch is built around it (``self.model.mean`` is
        the same object).
    device
        Where the branch lives.
    noise
        Target noise power per shell, normalised units (`target_noise`).
    """

    def __init__(self, cfg: TrainConfig, mean: WAERestorer, device: torch.device,
                 noise: NoiseSpectrum) -> None:
        self.cfg = cfg
        self.fam = cfg.family
        self.device = device
        self.noise = noise
        # built under a forked RNG: the mean path's later draws stay those of a run
        # without the family
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + _INIT_SEED)
            model = StochasticRestorer(self.fam.stochastic_config(cfg.restorer), mean=mean)
        self.model = model.to(device)
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed + _GEN_SEED)
        dim = self.fam.summary_dim + self.fam.latent_channels
        self.divergence = matching_divergence(cfg, dim).to(device) \
            if self.fam.posterior_matching else None
        self.score_balancer = TermBalancer(self.fam.weight, cfg.balance_steps)
        self.rec_balancer = TermBalancer(1.0, cfg.balance_steps)
        self.match_balancer = TermBalancer(self.fam.matching_weight, cfg.balance_steps)

    def branch_parameters(self) -> list[torch.nn.Parameter]:
        """Everything the family trains (the branch, posterior encoder): not the mean."""
        return [p for n, p in self.model.named_parameters() if not n.startswith("mean.")]

    def _draw(self, batch: int, m: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
        return self.model.draw_prior(shape, batch, m, self.gen, self.device)

    def loss(self, batch: TrainingBatch, restored: torch.Tensor, feats: list[torch.Tensor],
             rec_value: float) -> FamilyLoss:
        """The family's loss of one step from the mean path's restoration and decoder
        features (`RestorerOutput`) of the batch."""
        self.model.branch.train()
        k = self.fam.branch_batch
        if 0 < k < restored.shape[0]:  # the branch trains on the first k patches only
            batch = TrainingBatch(batch.inputs[:k], batch.targets[:k], batch.valid[:k],
                                  batch.target_measured[:k], batch.input_measured)
            restored, feats = restored[:k], [f[:k] for f in feats]
        mean = restored.detach().float()
        b, shape, m = mean.shape[0], tuple(mean.shape[-3:]), self.fam.samples
        feats = [f.float() for f in feats]
        r = self.model.decode_branch(feats, self._draw(b, m, shape)).float()
        samples = mean + r
        if m >= 2:
            w = fourier_weights(batch, self.cfg.wedge_weight)
            noise = draw_noise(self.noise, shape, b * m, self.gen, self.device)
            score = family_score(self.fam.score, samples, batch.targets, w,
                                 noise.reshape(b, m, *shape), batch.target_measured,
                                 batch.input_measured, valid=batch.valid).mean()
            spread_src = samples
        else:
            score, _ = masked_fourier_loss(samples, batch, self.cfg.wedge_weight)
            with torch.no_grad():
                extra = mean + self.model.decode_branch(feats, self._draw(b, 1, shape))
            spread_src = torch.cat([samples.detach(), extra], dim=1)
        sw = self.score_balancer.weight(rec_value, float(score.detach()))
        loss = sw * score
        s_meas, s_wedge = sample_spread(spread_src.detach(), batch.input_measured)
        out = {"fam_score": float(score.detach()), "fam_weight": sw,
               "fam_spread_measured": s_meas, "fam_spread_wedge": s_wedge}
        joint = None
        if self.divergence is not None:
            part, figures, joint = self._posterior_terms(batch, mean, feats, rec_value)
            loss = loss + part
            out |= figures
        out["fam_loss"] = float(loss.detach())
        return FamilyLoss(loss, out, joint)

    def _posterior_terms(self, batch: TrainingBatch, mean: torch.Tensor,
                         feats: list[torch.Tensor], rec_value: float
                         ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        enc = self.model.posterior_encoder
        assert enc is not None and self.divergence is not None
        enc.train()
        miss = missing_part(batch.targets * batch.valid, batch.target_measured,
                            batch.input_measured)
        mu, logvar = enc(batch.inputs.float(), miss)
        z_q = PosteriorEncoder.sample(mu, logvar, self.gen)
        shape = tuple(mean.shape[-3:])
        field = [z_q[:, None]] + self._draw(mean.shape[0], 1, shape)[1:]
        rec_q, _ = masked_fourier_loss(mean + self.model.decode_branch(feats, field)[:, :1],
                                       batch, self.cfg.wedge_weight)
        summary = self.model.summary(feats[0])
        match = latent_matching(self.divergence, summary, z_q, self.gen)
        rw = self.rec_balancer.weight(rec_value, float(rec_q.detach()))
        # the matching weight from the gradients both terms send to z_q (an unbiased
        # MMD starts near 0 while q is still the prior, so its value cannot set a scale)
        if z_q.requires_grad and match.requires_grad:
            self.match_balancer.observe_grads(_grad(rec_q, z_q), _grad(match, z_q))
        mw = self.match_balancer.weight(float(rec_q.detach()), float(match.detach()),
                                        value_scale=0.0)
        return rw * rec_q + mw * match, {"fam_rec_q": float(rec_q.detach()),
                                         "fam_match": float(match.detach()),
                                         "fam_match_weight": mw}, \
            joint_codes(summary, z_q.detach())

    def after_backward(self, grad_clip: float, dist_enabled: bool) -> None:
        """Average the branch's gradients over processes (it is outside DDP) and clip
        them on their own (the mean path's clipping stays as without the family)."""
        params = [p for p in self.branch_parameters() if p.grad is not None]
        if dist_enabled:
            import torch.distributed as tdist

            for p in params:
                tdist.all_reduce(p.grad)
                p.grad /= tdist.get_world_size()
        if grad_clip > 0 and params:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)

    def after_step(self, joint: torch.Tensor | None) -> dict[str, float]:
        """The WAE-GAN critic's update for an adversarial matching divergence, on the
        step's joint codes (`FamilyLoss.joint`)."""
        if self.divergence is None or joint is None \
                or self.fam.matching_divergence != "adversarial":
            return {}
        eps = torch.randn(joint.shape, generator=self.gen, device=self.device)
        prior = torch.cat([joint[:, :self.fam.summary_dim],
                           eps[:, self.fam.summary_dim:]], dim=1)
        return {"fam_disc": float(self.divergence.discriminator_step(joint, prior))}

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain state for ``checkpoint.pt``."""
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()
                   if not k.startswith("mean.")}
        return {"weights": weights, "gen": self.gen.get_state(),
                "balancers": {"score": self.score_balancer.state_dict(),
                              "rec": self.rec_balancer.state_dict(),
                              "match": self.match_balancer.state_dict()},
                "divergence": self.divergence.state_dict() if self.divergence else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""
        missing, unexpected = self.model.load_state_dict(state["weights"], strict=False)
        if unexpected or any(not k.startswith("mean.") for k in missing):
            raise RuntimeError(f"family weights do not fit (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        self.gen.set_state(state["gen"])
        self.score_balancer.load_state_dict(state["balancers"]["score"])
        self.rec_balancer.load_state_dict(state["balancers"]["rec"])
        self.match_balancer.load_state_dict(state["balancers"]["match"])
        if self.divergence is not None and state.get("divergence"):
            self.divergence.load_state_dict(state["divergence"])


__all__ = ["FamilyLoss", "FamilyTrainer", "matching_divergence", "sample_spread"]
