"""Training losses: masked Fourier reconstruction and scale-free latent weighting."""

from __future__ import annotations

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

    During the first `warmup` steps it records the mean size of the reconstruction and
    divergence terms; from then on the divergence is multiplied by
    lambda * rec_ref / div_ref, so lambda = 1 means "as large as the reconstruction term
    was at the start" whatever the intensity scale, latent size or divergence. During
    warm-up the running ratio is used. The references are saved in checkpoints.
    """

    def __init__(self, lam: float, warmup: int = 10) -> None:
        self.lam = float(lam)
        self.warmup = max(1, int(warmup))
        self.rec_sum = 0.0
        self.div_sum = 0.0
        self.count = 0

    def weight(self, rec: float, div: float) -> float:
        if self.count < self.warmup:
            self.rec_sum += abs(rec)
            self.div_sum += abs(div)
            self.count += 1
        if self.div_sum <= 1e-12:
            return self.lam
        return self.lam * self.rec_sum / self.div_sum

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "warmup": self.warmup, "rec_sum": self.rec_sum,
                "div_sum": self.div_sum, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.rec_sum = float(state["rec_sum"])
        self.div_sum = float(state["div_sum"])
        self.count = int(state["count"])
