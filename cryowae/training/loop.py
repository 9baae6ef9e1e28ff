"""The training loop of `cryowae train`.

Self-supervised missing-wedge restoration (see `augment.py`) plus latent matching: the
codes of the current batch together with a memory bank of recent codes (the aggregated
posterior) are pulled towards the prior by the chosen divergence.
"""

from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae import __version__
from cryowae.devices import resolve_device
from cryowae.divergences import (
    CodeBank,
    GaussianPrior,
    ReferencePrior,
    aggregate_with_bank,
    build_divergence,
    mmd_blockwise,
    prefers_prior,
)
from cryowae.errors import CryowaeInputError
from cryowae.models.checkpoint import (
    KIND_CHECKPOINT,
    load_state,
    save_restorer,
    save_state,
)
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.progress import NullProgress, ProgressReporter, ensure_progress
from cryowae.training.augment import make_batch
from cryowae.training.config import TrainConfig, save_config
from cryowae.training.data import SubtomogramSampler, TomogramSource
from cryowae.training.distributed import (
    DistInfo,
    broadcast_flag,
    init_distributed,
    shutdown_distributed,
)
from cryowae.training.loss import TermBalancer, masked_fourier_loss

METRIC_FIELDS = ["step", "elapsed_s", "loss", "rec", "rec_measured", "rec_wedge", "div",
                 "div_weight", "mmd_to_prior", "lr", "subtomos_per_s"]


@dataclass
class TrainResult:
    run_dir: Path
    rank: int
    steps: int
    elapsed_s: float
    final: dict[str, float]
    mode: str
    prior_check: str


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encode_reference_codes(model: WAERestorer, references: list[np.ndarray], patch: int,
                           device: torch.device, n_rotations: int = 8,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Codes of clean reference maps (normalised, centre-cropped or padded to the patch),
    each under `n_rotations` random rotations: the samples of the `reference` prior."""
    from cryowae.physics.rotation import random_rotations, rotate_volume

    codes = []
    with torch.no_grad():
        for ref in references:
            t = torch.from_numpy(((ref - ref.mean()) / (ref.std() + 1e-8)).astype(np.float32))
            t = t.to(device)[None, None]
            rot = random_rotations(n_rotations, generator=generator, device=device)
            vol = rotate_volume(t.expand(n_rotations, -1, -1, -1, -1), rot,
                                out_shape=(patch, patch, patch))
            z, _ = model.encode(vol)
            codes.append(z)
    return torch.cat(codes)


class Trainer:
    """Holds the state of one training run; `run()` trains until steps or time run out."""

    def __init__(self, sources: list[TomogramSource], cfg: TrainConfig, run_dir: str | Path,
                 resume: bool = False, references: list[np.ndarray] | None = None,
                 progress: ProgressReporter | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.progress = ensure_progress(progress)
        self.device = resolve_device(cfg.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if not self.dist.is_main:
            self.progress = NullProgress()  # rank 0 alone draws and writes
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        _seed_everything(cfg.seed)
        self.sources = sources
        for s in sources:
            if min(s.shape) < cfg.patch_size:
                raise CryowaeInputError(
                    f"{s.name}: shape {s.shape} is smaller than the patch size "
                    f"{cfg.patch_size}; use a smaller --config preset or patch_size")
        self.sampler = SubtomogramSampler(sources, cfg.patch_size, cfg.structure_bias,
                                          seed=cfg.seed + 1000 * self.dist.rank)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * (self.dist.rank + 1))
        self.model = WAERestorer(RestorerConfig(cfg.channels, cfg.depth, cfg.latent_dim,
                                                cfg.encoder, cfg.skip, cfg.skip_sigma)
                                 ).to(self.device)
        if not resume and cfg.divergence != "none" and cfg.init_codes > 0:
            self.init_code_scale(cfg.init_codes)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        if cfg.prior == "reference":
            if not references:
                raise CryowaeInputError("prior 'reference' needs --reference maps")
            codes = encode_reference_codes(self.model, references, cfg.patch_size,
                                           self.device, generator=self.gen)
            self.prior: Any = ReferencePrior.from_codes(codes)
        else:
            self.prior = GaussianPrior(cfg.latent_dim, sigma=cfg.prior_sigma)
        self.divergence = build_divergence(cfg.divergence, cfg.latent_dim, self.prior,
                                           **divergence_kwargs(cfg))
        self.divergence.to(self.device)
        self.bank = CodeBank(capacity=cfg.bank_size)  # pooled encoder features
        # the last codes seen (detached), for the monitoring figure during training; the
        # final figure and model.pt use codes of fresh subtomograms (`fresh_codes`)
        self.recent = CodeBank(capacity=256)
        self.balancer = TermBalancer(cfg.lambda_, cfg.balance_steps)
        self.step = 0
        self.elapsed = 0.0
        self.net: torch.nn.Module = self.model
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        self.prior_check = "not run"
        if resume:
            self._load_checkpoint()
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.total_steps = cfg.steps

    # -- checkpoints ---------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(), "step": self.step, "elapsed": self.elapsed,
            "config": self.cfg.to_dict(), "bank": self.bank.state_dict(),
            "recent": self.recent.state_dict(),
            "balancer": self.balancer.state_dict(),
            "divergence": self.divergence.state_dict() if hasattr(self.divergence,
                                                                  "state_dict") else {},
            "rng": {"torch": torch.get_rng_state(), "gen": self.gen.get_state(),
                    "numpy": self.sampler.rng.bit_generator.state},
            "prior": self.prior.state_dict() if hasattr(self.prior, "state_dict") else {},
        }

    def save(self, codes: torch.Tensor | None = None) -> None:
        """Write checkpoint.pt and model.pt (rank 0). `codes`: the sample of latent codes
        stored in model.pt (default: the recent training codes)."""
        if not self.dist.is_main:
            return
        save_state(self.run_dir / "checkpoint.pt", self._state(), KIND_CHECKPOINT)
        src = self.sources[0]
        if codes is None:
            codes = self.recent.codes()
        save_restorer(self.run_dir / "model.pt", self.model, self.cfg.to_dict(),
                      src.voxel_size, src.stats["full"], codes.cpu(),
                      extra={"step": self.step, "mode": self.sampler.mode,
                             "inputs": [s.name for s in self.sources]})

    def _load_checkpoint(self) -> None:
        state = load_state(self.run_dir / "checkpoint.pt", KIND_CHECKPOINT)
        old = state["config"]
        for key in ("patch_size", "channels", "depth", "latent_dim", "encoder", "skip",
                    "divergence"):
            if old.get(key) != getattr(self.cfg, key):
                raise CryowaeInputError(
                    f"--resume: {key} was {old.get(key)!r} in the checkpoint but is "
                    f"{getattr(self.cfg, key)!r} now; resume with the same settings")
        try:
            self.model.load_state_dict(state["weights"])
            self.opt.load_state_dict(state["optimizer"])
            self.bank.load_state_dict(state["bank"])
            self.recent.load_state_dict(state["recent"])
            self.balancer.load_state_dict(state["balancer"])
            if state.get("divergence") and hasattr(self.divergence, "load_state_dict"):
                self.divergence.load_state_dict(state["divergence"])
            if state.get("prior") and hasattr(self.prior, "load_state_dict"):
                self.prior.load_state_dict(state["prior"])
            torch.set_rng_state(state["rng"]["torch"])
            self.gen.set_state(state["rng"]["gen"])
            self.sampler.rng.bit_generator.state = state["rng"]["numpy"]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CryowaeInputError(f"--resume: checkpoint does not fit this run "
                                    f"({type(exc).__name__}: {str(exc)[:80]})") from None
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])

    # -- one step ------------------------------------------------------------------
    def _lr(self) -> float:
        warm = 10
        if self.step < warm:
            return self.cfg.lr * (self.step + 1) / warm
        frac = min(1.0, (self.step - warm) / max(1, self.total_steps - warm))
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        inputs, targets = self.sampler.sample(cfg.batch_size)
        batch = make_batch(inputs, targets, cfg.patch_size, cfg.tilt_min, cfg.tilt_max,
                           cfg.tilt_axis, self.device, generator=self.gen)
        use_amp = cfg.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred, z = self.net(batch.inputs)
        rec, parts = masked_fourier_loss(pred, batch, cfg.wedge_weight)
        z = z.float()
        out = {"rec": rec.item(), **parts}
        loss = rec
        div_grad_norm = None
        if cfg.divergence != "none":
            div = self._latent_penalty(z)
            if z.requires_grad and div.requires_grad:
                (g_div,) = torch.autograd.grad(div, z, retain_graph=True, allow_unused=True)
                div_grad_norm = float(g_div.norm()) if g_div is not None else None
            # The gradient an aggregate of N codes sends to each of the B batch codes is
            # O(1/N): the value-based weight is scaled by N/B so a larger bank sharpens
            # the estimate without diluting the force on the encoder. The gradient-based
            # weight measures that force directly and needs no such factor (applying it
            # twice made the penalty N/B times stronger than reconstruction on the codes,
            # and they ran away: |mean z| 0.3 -> 6 in 100 steps). Whether the value weight
            # gets N/B at all is the divergence's default (`value_scale`).
            weight = self.balancer.weight(rec.item(), div.item(),
                                          value_scale=self.value_scale(z.shape[0]))
            loss = rec + weight * div
            out |= {"div": div.item(), "div_weight": weight}
        out["loss"] = loss.item()
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"loss became {out['loss']} at step {self.step}; "
                                     "the last checkpoint is intact (lower --lr?)")
        for group in self.opt.param_groups:
            group["lr"] = self._lr()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        rec_grad = getattr(self.model, "decoder_code_grad", None)
        if div_grad_norm is not None and rec_grad is not None:
            self.balancer.observe_grads(float(rec_grad.norm()), div_grad_norm)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if cfg.divergence == "adversarial":
            z_all = torch.cat([z.detach(), self.banked_codes()], dim=0)
            z_p = self.prior.sample(z_all.shape[0], generator=self.gen, device=self.device)
            out["disc"] = float(self.divergence.discriminator_step(z_all, z_p))
        if cfg.bank_size > 0:
            self.bank.push(self.model.last_pooled)
        self.recent.push(z.detach())
        out["lr"] = self.opt.param_groups[0]["lr"]
        self.step += 1
        return out

    def value_scale(self, batch: int) -> float:
        """N/B for an aggregate of N = batch + banked codes, or 1 where the config or
        (by default) the divergence turns the factor off."""
        scaled = self.cfg.bank_value_scaling
        if scaled is None:
            scaled = self.divergence.bank_value_scaling
        return (batch + len(self.bank)) / batch if scaled else 1.0

    def banked_codes(self, grad: bool = False) -> torch.Tensor:
        """Codes of the banked features through the current latent head (N, latent_dim)."""
        feats = self.bank.codes()
        if feats.numel() == 0:
            return torch.zeros(0, self.cfg.latent_dim, device=self.device)
        with torch.set_grad_enabled(grad):
            return self.model.codes_from_pooled(feats.to(self.device))

    def _latent_penalty(self, z: torch.Tensor) -> torch.Tensor:
        """Divergence between [batch codes, banked codes] and a prior sample.

        The bank holds pooled encoder features, mapped through the current latent head
        (without gradient, unless `bank_grad`), and re-centred on the batch's mean
        (`bank_centering`). Why: the banked features come from older encoder weights, so
        the bank lags behind the codes; a detached, lagging aggregate repels each new
        batch away from where the codes were, the encoder moves all codes together, the
        bank follows, and the codes run away (measured on the 80x128x128 benchmark
        tomogram, IMQ-MMD, 3 minutes: |mean z| 17-23 and code std 0.03 for banks of 64
        or 1,024 uncentred codes, with or without the head's gradient). Centred, the bank
        supplies only the spread of the aggregate (its repulsion is translation-free,
        as within a minibatch) while the batch codes carry the mean: |mean z| 0.56,
        std 1.05 against the N(0, I) prior in the same run.
        """
        z_all = aggregate_with_bank(z, self.banked_codes(grad=self.cfg.bank_grad),
                                    center=self.cfg.bank_centering)
        z_p = self.prior.sample(z_all.shape[0], generator=self.gen, device=self.device)
        return self.divergence(z_all, z_p.to(z_all.dtype))

    def init_code_scale(self, n: int) -> None:
        """Start the codes on the prior's scale: encode `n` training-style subtomograms
        and standardise the latent head on them (`WAERestorer.standardise_codes`). Only
        for runs with a latent penalty; the `none` ablation keeps the plain initialisation.
        Measured on the seed-2 benchmark tomogram (cpu-small): without it the first codes
        have a spread of 0.05 against the prior's 1."""
        codes = self.fresh_codes(n)
        self.model.standardise_codes(codes.mean(0), codes.std(0), self.cfg.prior_sigma)

    @torch.no_grad()
    def fresh_codes(self, n: int = 256) -> torch.Tensor:
        """Codes (n, latent_dim) of `n` new training-style subtomograms under the current
        weights: the aggregated posterior of the final model (the recent-code queue mixes
        codes from older weights)."""
        self.model.eval()
        out = []
        while sum(len(c) for c in out) < n:
            inputs, targets = self.sampler.sample(self.cfg.batch_size)
            batch = make_batch(inputs, targets, self.cfg.patch_size, self.cfg.tilt_min,
                               self.cfg.tilt_max, self.cfg.tilt_axis, self.device,
                               generator=self.gen)
            out.append(self.model.encode(batch.inputs)[0].float())
        return torch.cat(out)[:n]

    def mmd_to_prior(self, codes: torch.Tensor | None = None) -> float:
        """Monitoring figure: IMQ MMD between codes (default: the recent training codes)
        and a prior sample of the same size."""
        codes = (self.recent.codes() if codes is None else codes).to(self.device)
        if codes.shape[0] < 16:
            return float("nan")
        ref = GaussianPrior(self.cfg.latent_dim, self.cfg.prior_sigma)
        z_p = ref.sample(codes.shape[0], generator=self.gen, device=self.device)
        with torch.no_grad():
            return float(mmd_blockwise(codes, z_p, scale=self.cfg.prior_sigma))

    def refill(self) -> None:
        """Refill the inputs' missing wedges with the current model's prediction."""
        from cryowae.training.refill import refill_volume

        for src in self.sources:
            for which in (("even", "odd") if self.sampler.noise2noise else ("full",)):
                src.refilled[which] = refill_volume(
                    self.model, getattr(src, which), src.stats[which], self.cfg.tilt_min,
                    self.cfg.tilt_max, self.cfg.tilt_axis, self.cfg.patch_size, self.device)
        self.progress.log(f"step {self.step}: refilled the missing wedge of the inputs")

    # -- the run ---------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        log = self.progress.log if self.dist.is_main else (lambda m: None)
        log(f"training mode: {self.sampler.mode}; divergence {cfg.divergence}"
            + (f" ({cfg.kernel} kernel)" if cfg.divergence == "mmd" else "")
            + f"; device {self.device}; {self.dist.world_size} process(es)")
        if cfg.divergence != "none" and cfg.check_prior_preference and self.step == 0:
            chk = prefers_prior(self.divergence, self.prior,
                                n=min(cfg.bank_size + cfg.batch_size, 4096),
                                n_seeds=5, device=self.device)
            self.prior_check = chk.message
            if not chk.passed:
                log(f"warning: {chk.message}")
        metrics_path = self.run_dir / "metrics.csv"
        if self.dist.is_main and (self.step == 0 or not metrics_path.exists()):
            with open(metrics_path, "w", newline="") as f:
                csv.writer(f).writerow(METRIC_FIELDS)
        tb = _tensorboard(self.run_dir) if self.dist.is_main else None
        budget = cfg.minutes * 60 if cfg.minutes else None
        if cfg.refill_every and self.step >= cfg.refill_every:
            self.refill()  # refilled volumes are not checkpointed: rebuild them on resume
        self.progress.start(cfg.steps, "training", done=self.step)
        t_start = time.perf_counter() - self.elapsed
        last: dict[str, float] = {}
        steps_at_start = self.step
        t_run = time.perf_counter()
        stop = False
        while self.step < cfg.steps and not stop:
            last = self.train_step()
            self.elapsed = time.perf_counter() - t_start
            rate = (self.step - steps_at_start) * cfg.batch_size / max(
                time.perf_counter() - t_run, 1e-9)
            if budget and self.step - steps_at_start == 3:
                # the step horizon of the LR schedule follows the time budget
                per_step = (time.perf_counter() - t_run) / 3
                left = max(0.0, budget - self.elapsed)
                self.total_steps = min(cfg.steps, self.step + int(left / per_step))
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                row = {"step": self.step, "elapsed_s": round(self.elapsed, 2),
                       "mmd_to_prior": self.mmd_to_prior(), "subtomos_per_s": rate} | last
                if self.dist.is_main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow([_fmt(row.get(k, "")) for k in METRIC_FIELDS])
                    if tb is not None:
                        for k, v in row.items():
                            if isinstance(v, float) and math.isfinite(v):
                                tb.add_scalar(k, v, self.step)
            if cfg.refill_every and self.step % cfg.refill_every == 0:
                self.refill()
            if self.step % cfg.checkpoint_every == 0:
                self.save()
            self.progress.advance(1, loss=last["loss"], rec=last["rec"],
                                  div=last.get("div", 0.0))
            stop = (budget is not None and self.elapsed >= budget) or self.progress.cancelled
            stop = broadcast_flag(stop, self.dist, self.device)
        codes = self.fresh_codes() if self.dist.is_main else None
        self.save(codes)
        self.progress.finish()
        final = last | {"mmd_to_prior": self.mmd_to_prior(codes) if codes is not None
                        else float("nan")}
        if tb is not None:
            tb.close()
        shutdown_distributed(self.dist)
        return TrainResult(self.run_dir, self.dist.rank, self.step, self.elapsed, final,
                           self.sampler.mode, self.prior_check)


def divergence_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """The options of `cfg` that apply to its divergence."""
    return {
        "mmd": {"kernel": cfg.kernel},
        "sinkhorn": {"blur": cfg.blur, "scaling": cfg.scaling, "p": cfg.sinkhorn_p},
        "sliced": {"n_projections": cfg.n_projections, "seed": cfg.seed},
        "adversarial": {"seed": cfg.seed},
        "none": {},
    }[cfg.divergence]


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _tensorboard(run_dir: Path) -> Any:
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


def train(sources: list[TomogramSource], cfg: TrainConfig, run_dir: str | Path,
          resume: bool = False, references: list[np.ndarray] | None = None,
          progress: ProgressReporter | None = None) -> TrainResult:
    """Train a restorer on `sources`; checkpoints and metrics go to `run_dir`."""
    return Trainer(sources, cfg, run_dir, resume, references, progress).run()


__all__ = ["TrainResult", "Trainer", "train", "resolve_device", "__version__"]
