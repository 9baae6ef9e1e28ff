"""What a training run reports: codes of fresh subtomograms, the MMD of codes to the
prior, and the metrics log (``metrics.csv``, optionally TensorBoard)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import torch

from cryowae.divergences import GaussianPrior, mmd_blockwise
from cryowae.models.restorer import WAERestorer
from cryowae.training.augment import make_batch
from cryowae.training.config import TrainConfig
from cryowae.training.data import SubtomogramSampler

#: columns of ``metrics.csv``
METRIC_FIELDS = ["step", "elapsed_s", "loss", "rec", "rec_measured", "rec_wedge", "div",
                 "div_weight", "mmd_to_prior", "lr", "subtomos_per_s",
                 # the held-out validation loss, every `validation.every` steps
                 "val_loss",
                 # the posterior-family branch (`family_step`, `family_report`)
                 "fam_loss", "fam_score", "fam_weight", "fam_spread_measured",
                 "fam_spread_wedge", "fam_rec_q", "fam_match", "fam_match_weight",
                 "family_mmd", "family_mmd_null"]


@torch.no_grad()
def fresh_codes(model: WAERestorer, sampler: SubtomogramSampler, cfg: TrainConfig,
                device: torch.device, generator: torch.Generator,
                n: int = 256) -> torch.Tensor:
    """Codes (n, latent_dim) of `n` new training-style subtomograms under the current
    weights (the model is left in eval mode): the aggregated posterior of the model as
    it is now (a queue of recent training codes mixes codes from older weights)."""
    model.eval()
    out: list[torch.Tensor] = []
    while sum(len(c) for c in out) < n:
        inputs, targets = sampler.sample(cfg.batch_size)
        batch = make_batch(inputs, targets, cfg.patch_size, cfg.geometry, device,
                           generator=generator)
        out.append(model.encode(batch.inputs)[0].float())
    return torch.cat(out)[:n]


def mmd_to_prior(codes: torch.Tensor, prior_sigma: float, generator: torch.Generator,
                 device: torch.device) -> float:
    """Monitoring figure: the IMQ MMD between `codes` (N, d) and as many samples of
    N(0, prior_sigma^2 I); NaN for fewer than 16 codes."""
    codes = codes.to(device)
    if codes.shape[0] < 16:
        return float("nan")
    ref = GaussianPrior(codes.shape[1], prior_sigma)
    z_p = ref.sample(codes.shape[0], generator=generator, device=device)
    with torch.no_grad():
        return float(mmd_blockwise(codes, z_p, scale=prior_sigma))


class MetricsLog:
    """Rows of figures to ``metrics.csv`` in the run directory (and to TensorBoard when
    it is installed and ``CRYOWAE_NO_TENSORBOARD`` is unset).

    Parameters
    ----------
    run_dir
        The run directory.
    fresh
        Start a new file (header only); otherwise rows are appended to the existing one
        (a resumed run), or a new one is started if there is none.
    enabled
        False on the ranks of a multi-process run that do not write.
    """

    def __init__(self, run_dir: Path, fresh: bool, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.csv"
        self.enabled = enabled
        self._tb: Any = None
        if not enabled:
            return
        if fresh or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(METRIC_FIELDS)
        self._tb = _tensorboard(run_dir)

    def write(self, step: int, row: dict[str, Any]) -> None:
        """Append one row (missing fields stay empty; floats with 6 significant digits)."""
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in METRIC_FIELDS])
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _tensorboard(run_dir: Path) -> Any:
    """A SummaryWriter, or None when TensorBoard is off, missing or broken (the CSV
    holds everything)."""
    if os.environ.get("CRYOWAE_NO_TENSORBOARD"):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    try:
        return SummaryWriter(str(run_dir / "tensorboard"))
    except Exception:  # tensorboard installed but broken: metrics.csv still has it all
        return None


__all__ = ["METRIC_FIELDS", "MetricsLog", "fresh_codes", "mmd_to_prior"]
