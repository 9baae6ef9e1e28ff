"""Training losses: masked Fourier reconstruction and scale-free latent weighting."""

from __future__ import annotations

import math

import torch

from cryowae.training.augment import TrainingBatch


def fourier_weights(batch: TrainingBatch, wedge_weight: float) -> torch.Tensor:
    """Loss weights over rfft frequencies (B, P, P, P//2+1).

    Zero where the rotated target was not measured; 1 where it was measured and the
    input saw it too; `wedge_weight` where the target was measured but the input lacks
    it (the region the network must fill in).
    """
    m_in = batch.input_measured.expand_as(batch.target_measured)
    return batch.target_measured * (1.0 + (wedge_weight - 1.0) * (1.0 - m_in))


def masked_fourier_loss(pred: torch.Tensor, batch: TrainingBatch,
                        wedge_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted squared error between prediction and target in Fourier space.

    Real-space voxels that the rotation brought in from outside the data are excluded
    first. Returns the loss (mean over weighted frequencies, in units of the normalised
    intensity squared per voxel) and its split into measured and wedge parts.
    """
    diff = (pred.float() - batch.targets) * batch.valid
    spec = torch.fft.rfftn(diff[:, 0], dim=(-3, -2, -1), norm="ortho")
    power = spec.real**2 + spec.imag**2
    w = fourier_weights(batch, wedge_weight)
    loss = (w * power).sum() / w.sum().clamp_min(1.0)
    with torch.no_grad():
        m_in = batch.input_measured.expand_as(w)
        seen = batch.target_measured * m_in
        unseen = batch.target_measured * (1 - m_in)
        parts = {
            "rec_measured": float((seen * power).sum() / seen.sum().clamp_min(1.0)),
            "rec_wedge": float((unseen * power).sum() / unseen.sum().clamp_min(1.0)),
        }
    return loss, parts


class TermBalancer:
    """Removes the per-dataset tuning of lambda.

    Two measures of how strongly each term acts are combined, and the larger weight is
    used, so lambda = 1 means "the divergence acts on the codes at least as strongly as
    reconstruction":

    - values: over the first `warmup` steps the mean sizes of the reconstruction and
      divergence terms are recorded (rec_ref, div_ref) -> lambda * rec_ref / div_ref;
    - gradients: running means (EMA) of the norms of the gradients that the two terms
      send to the batch's codes -> lambda * |d rec / dz| / |d div / dz|. This is what
      keeps the codes on the prior once the decoder starts to use them (value balancing
      alone let the codes drift away: the MMD gradient per code is O(1/N)).

    Both are ratios of the data's own numbers, invariant to the intensity scale, the
    latent size and the divergence. The state is saved in checkpoints.
    """

    def __init__(self, lam: float, warmup: int = 10, beta: float = 0.9) -> None:
        self.lam = float(lam)
        self.warmup = max(1, int(warmup))
        self.beta = float(beta)
        self.rec_sum = 0.0
        self.div_sum = 0.0
        self.count = 0
        self.grad_rec = 0.0
        self.grad_div = 0.0
        self.grad_count = 0

    def observe_grads(self, rec_grad_norm: float, div_grad_norm: float) -> None:
        """Record the norms of d rec / dz and d div / dz of one step."""
        if not (math.isfinite(rec_grad_norm) and math.isfinite(div_grad_norm)):
            return
        b = self.beta if self.grad_count else 0.0
        self.grad_rec = b * self.grad_rec + (1 - b) * rec_grad_norm
        self.grad_div = b * self.grad_div + (1 - b) * div_grad_norm
        self.grad_count += 1

    def weight(self, rec: float, div: float, value_scale: float = 1.0) -> float:
        """The divergence weight for this step. `value_scale` multiplies the value-based
        weight only (the trainer passes N/B for an aggregate of N codes of which B get
        gradients); the gradient-based weight already sees the force per code."""
        if self.count < self.warmup:
            self.rec_sum += abs(rec)
            self.div_sum += abs(div)
            self.count += 1
        w = self.lam if self.div_sum <= 1e-12 else self.lam * self.rec_sum / self.div_sum
        w *= value_scale
        if self.grad_count and self.grad_div > 1e-20:
            w = max(w, self.lam * self.grad_rec / self.grad_div)
        return w

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "warmup": self.warmup, "rec_sum": self.rec_sum,
                "div_sum": self.div_sum, "count": self.count, "grad_rec": self.grad_rec,
                "grad_div": self.grad_div, "grad_count": self.grad_count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.rec_sum = float(state["rec_sum"])
        self.div_sum = float(state["div_sum"])
        self.count = int(state["count"])
        self.grad_rec = float(state.get("grad_rec", 0.0))
        self.grad_div = float(state.get("grad_div", 0.0))
        self.grad_count = int(state.get("grad_count", 0))
