"""The training loop of `cryowae train`.

Self-supervised missing-wedge restoration (see `augment.py`) plus latent matching: the
codes of the current batch together with a memory bank of recent codes (the aggregated
posterior) are pulled towards the prior by the chosen divergence (`latent.py`). One step
(`Trainer.train_step`) is: sample a batch, one forward pass, the reconstruction term
(`loss.py`), the latent term weighted by the `TermBalancer`, one optimiser step.
Checkpoints and resumption live in `resume.py`, the metrics log and the monitoring
figures in `monitor.py`, the learning-rate schedule and its time budget in
`schedule.py`. With ``cfg.family`` on, the posterior-family branch
(`family_step.FamilyTrainer`) adds its terms to the same step without touching the mean
path, and `family_report.matching_figure` gives the final latent-matching figure.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryowae.devices import resolve_device
from cryowae.divergences import CodeBank, prefers_prior
from cryowae.errors import CryowaeInputError
from cryowae.models.checkpoint import KIND_CHECKPOINT, load_state, save_restorer, save_state
from cryowae.models.restorer import RestorerOutput, WAERestorer
from cryowae.precision import autocast, compiled, to_layout
from cryowae.progress import Cancelled, NullProgress, ProgressReporter, ensure_progress
from cryowae.training.augment import make_batch
from cryowae.training.averaging import WeightAverage
from cryowae.training.config import TrainConfig, save_config
from cryowae.training.data import SubtomogramSampler, TomogramSource
from cryowae.training.distributed import (
    DistInfo,
    broadcast_ints,
    init_distributed,
    shutdown_distributed,
)
from cryowae.training.family_report import describe, matching_figure
from cryowae.training.family_step import FamilyTrainer
from cryowae.training.latent import LatentMatcher
from cryowae.training.loss import TermBalancer, masked_fourier_loss
from cryowae.training.monitor import MetricsLog, fresh_codes, mmd_to_prior
from cryowae.training.noise import target_noise
from cryowae.training.resume import (
    RunState,
    adopt_saved_family,
    check_same_settings,
    restore_run_state,
    run_state_dict,
)
from cryowae.training.schedule import RunClock, learning_rate
from cryowae.training.validation import ValidationMonitor, resumed_settings


@dataclass
class TrainResult:
    """What `train` returns: where the run lives, how far it got, its last figures."""

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
        saved = None
        if resume:
            saved = load_state(self.run_dir / "checkpoint.pt", KIND_CHECKPOINT)
            cfg = self.cfg = resumed_settings(saved["config"],
                                              adopt_saved_family(saved["config"], cfg))
            check_same_settings(saved["config"], cfg)
        # the held-out validation slabs are cut off the sampler's volumes (validation.py)
        train_sources, self.validation = ValidationMonitor.build(sources, cfg, self.device,
                                                                 self.progress.log)
        self.sampler = SubtomogramSampler(train_sources, cfg.patch_size, cfg.structure_bias,
                                          seed=cfg.seed + 1000 * self.dist.rank)
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919 * (self.dist.rank + 1))
        self.model = WAERestorer(cfg.restorer).to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if not resume and cfg.divergence != "none" and cfg.init_codes > 0:
            self.init_code_scale(cfg.init_codes)
        params = list(self.model.parameters())
        self.family: FamilyTrainer | None = None
        if cfg.family.enabled:
            self.family = FamilyTrainer(cfg, self.model, self.device, target_noise(
                sources, cfg.geometry, cfg.family.noise))
            params += self.family.branch_parameters()
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the running average of the weights (the branch's too, around its mean path):
        # what validation scores and model.pt stores
        self.average = WeightAverage(self.family.model if self.family else self.model,
                                     cfg.ema_decay)
        self.family_figure: dict[str, float] = {}
        self.latent = LatentMatcher(cfg, self.model, self.device, self.gen, references,
                                    prior_state=saved.get("prior") if saved else None)
        # the last codes seen (detached), for the monitoring figure during training; with
        # a latent penalty the final figure and model.pt use codes of fresh subtomograms
        # (`fresh_codes`)
        self.recent = CodeBank(capacity=256)
        self.balancer = TermBalancer(cfg.lambda_, cfg.balance_steps)
        self.step = 0
        self.elapsed = 0.0
        self.net: torch.nn.Module = self.model
        if self.dist.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None)
        if cfg.compile:  # eager fallback, said in one line, if compiling fails
            self.net = compiled(self.net, cfg.compile_backend, self.progress.log)
        self.prior_check = "not run"
        if saved is not None:
            self.step, self.elapsed = restore_run_state(self._run_state(), saved)
            if self.validation is not None:
                self.validation.load_state_dict(saved.get("validation"))
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.total_steps = cfg.steps

    def _run_state(self) -> RunState:
        return RunState(self.model, self.opt, self.latent, self.recent, self.balancer,
                        self.sampler, self.gen, self.family, self.average)

    @property
    def kept_model(self) -> WAERestorer:
        """The mean path as model.pt stores it: the running average of the weights."""
        avg = self.average.module
        return avg.mean if self.family is not None else avg

    # -- checkpoints -----------------------------------------------------------------
    def save(self, codes: torch.Tensor | None = None) -> None:
        """Write checkpoint.pt and model.pt (rank 0). `codes`: the sample of latent codes
        stored in model.pt (default: the recent training codes)."""
        if not self.dist.is_main:
            return
        save_state(self.run_dir / "checkpoint.pt",
                   run_state_dict(self._run_state(), self.cfg, self.step, self.elapsed)
                   | ({"validation": self.validation.state_dict()} if self.validation
                      else {}), KIND_CHECKPOINT)
        src = self.sources[0]
        if codes is None:
            codes = self.recent.codes()
        extra = {"step": self.step, "mode": self.sampler.mode,
                 "inputs": [s.name for s in self.sources]}
        if self.family is not None:
            extra |= {"family_noise": self.family.noise.to_dict(),
                      "family_matching": dict(self.family_figure)}
        save_restorer(self.run_dir / "model.pt", self.kept_model, self.cfg.to_dict(),
                      src.voxel_size, src.stats["full"], codes.cpu(), extra=extra,
                      geometry=self.cfg.geometry,
                      stochastic=self.average.module if self.family else None)

    # -- one step --------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimiser step; returns the step's figures (loss terms, weight, lr)."""
        cfg = self.cfg
        self.net.train()
        inputs, targets = self.sampler.sample(cfg.batch_size)
        batch = make_batch(inputs, targets, cfg.patch_size, cfg.geometry, self.device,
                           generator=self.gen)
        # the branch's terms, every family.branch_every-th step: no gradient reaches the
        # mean, whose steps are the same with the branch, without it, or between its steps
        family = self.family if self.family is not None and \
            self.step % cfg.family.branch_every == 0 else None
        # with a latent penalty, a zero leaf added to z where the decoder reads it: its
        # gradient after backward is the reconstruction's on z, for the balancer (no
        # second backward pass needed)
        probe = torch.zeros(batch.inputs.shape[0], self.model.latent_dim, device=self.device,
                            requires_grad=True) if self.latent.active else None
        # bf16 autocast (CUDA) around the network only: the losses and their FFTs run
        # in float32 on the outputs' .float()
        with autocast(self.device, cfg.amp):
            fwd: RestorerOutput = self.net(to_layout(batch.inputs, cfg.channels_last),
                                           with_features=True, z_probe=probe)
        rec, parts = masked_fourier_loss(fwd.restored, batch, cfg.wedge_weight)
        z = fwd.z.float()
        out = {"rec": rec.item(), **parts}
        loss = rec
        g_div = None
        if self.latent.active:
            div = self.latent.penalty(z)
            if z.requires_grad and div.requires_grad:
                (g_div,) = torch.autograd.grad(div, z, retain_graph=True, allow_unused=True)
            # The gradient an aggregate of N codes sends to each of the B batch codes is
            # O(1/N): the value-based weight is scaled by N/B so a larger bank sharpens
            # the estimate without diluting the force on the encoder. The gradient-based
            # weight measures that force directly and needs no such factor (applying it
            # twice made the penalty N/B times stronger than reconstruction on the codes,
            # and they ran away: |mean z| 0.3 -> 6 in 100 steps). Whether the value weight
            # gets N/B at all is the divergence's default (`LatentMatcher.value_scale`).
            weight = self.balancer.weight(rec.item(), div.item(),
                                          value_scale=self.latent.value_scale(z.shape[0]))
            loss = rec + weight * div
            out |= {"div": div.item(), "div_weight": weight}
        out["loss"] = loss.item()
        fam = None
        if family is not None:
            fam = family.loss(batch, fwd.restored.float(),
                              [f.float() for f in fwd.features], out["rec"])
            out |= fam.figures
        if not math.isfinite(out["loss"] + out.get("fam_loss", 0.0)):
            raise FloatingPointError(f"loss became {out['loss']} at step {self.step}; "
                                     "the last checkpoint is intact (lower --lr?)")
        for group in self.opt.param_groups:
            group["lr"] = learning_rate(self.step, self.total_steps, cfg.lr)
        self.opt.zero_grad(set_to_none=True)
        (loss if fam is None else loss + fam.loss).backward()
        if g_div is not None and probe is not None and probe.grad is not None:
            self.balancer.observe_grads(float(probe.grad.norm()), float(g_div.norm()))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if family is not None:
            family.after_backward(cfg.grad_clip, self.dist.enabled)
        self.opt.step()
        self.average.update()
        out |= self.latent.after_step(z, fwd.pooled.float())
        if family is not None:
            out |= family.after_step(fam.joint if fam is not None else None)
        self.recent.push(z.detach())
        out["lr"] = self.opt.param_groups[0]["lr"]
        self.step += 1
        return out

    def init_code_scale(self, n: int) -> None:
        """Start the codes on the prior's scale: encode `n` training-style subtomograms
        and standardise the latent head on them (`WAERestorer.standardise_codes`). Only
        for runs with a latent penalty; the `none` ablation keeps the plain initialisation.
        Measured on the seed-2 benchmark tomogram (cpu-small): without it the first codes
        have a spread of 0.05 against the prior's 1."""
        codes = self.fresh_codes(n)
        self.model.standardise_codes(codes.mean(0), codes.std(0), self.cfg.prior_sigma)

    def fresh_codes(self, n: int = 256, model: WAERestorer | None = None) -> torch.Tensor:
        """Codes (n, latent_dim) of `n` new training-style subtomograms under `model`'s
        weights (default: the current ones; `monitor.fresh_codes`)."""
        return fresh_codes(self.model if model is None else model, self.sampler, self.cfg,
                           self.device, self.gen, n)

    def mmd_to_prior(self, codes: torch.Tensor | None = None) -> float:
        """Monitoring figure: IMQ MMD between codes (default: the recent training codes)
        and a prior sample of the same size."""
        codes = self.recent.codes() if codes is None else codes
        return mmd_to_prior(codes, self.cfg.prior_sigma, self.gen, self.device)

    def refill(self) -> None:
        """Refill the inputs' missing wedges with the current model's prediction."""
        from cryowae.training.refill import refill_volume

        geo = self.cfg.geometry
        for src in self.sampler.sources:
            for which in (("even", "odd") if self.sampler.noise2noise else ("full",)):
                src.refilled[which] = refill_volume(
                    self.model, getattr(src, which), src.stats[which], geo.tilt_min,
                    geo.tilt_max, geo.axis, self.cfg.patch_size, self.device)
        self.progress.log(f"step {self.step}: refilled the missing wedge of the inputs")

    # -- the run ---------------------------------------------------------------------
    def _check_prior_preference(self) -> None:
        cfg = self.cfg
        if not (self.latent.active and cfg.check_prior_preference and self.step == 0):
            return
        chk = prefers_prior(self.latent.divergence, self.latent.prior,
                            n=min(cfg.bank_size + cfg.batch_size, 4096), n_seeds=5,
                            device=self.device)
        self.prior_check = chk.message
        if not chk.passed and self.dist.is_main:
            self.progress.log(f"warning: {chk.message}")

    def run(self) -> TrainResult:
        """Train until `cfg.steps` or `cfg.minutes` run out (checkpoints every
        `checkpoint_every` steps, model.pt at the end). A `ProgressReporter.cancel` stops
        at the next step: the checkpoint of that step is written, then `Cancelled` is
        raised."""
        cfg = self.cfg
        if self.dist.is_main:
            self.progress.log(
                f"training mode: {self.sampler.mode}; divergence {cfg.divergence}"
                + (f" ({cfg.kernel} kernel)" if cfg.divergence == "mmd" else "")
                + f"; tilt {cfg.geometry.describe()}; device {self.device}; "
                + (f"family: {cfg.family.samples} sample(s) per input, {cfg.family.score} "
                   f"score, posterior matching "
                   f"{cfg.family.matching_divergence if cfg.family.posterior_matching else 'off'}"
                   f", noise {self.family.noise.source}; " if self.family else "family off; ")
                + f"{self.dist.world_size} process(es)")
        if self.validation is not None and self.dist.is_main:
            self.progress.log(self.validation.describe())
        self._check_prior_preference()
        log = MetricsLog(self.run_dir, fresh=self.step == 0, enabled=self.dist.is_main)
        budget = cfg.minutes * 60 if cfg.minutes else None
        if cfg.refill_every and self.step >= cfg.refill_every:
            self.refill()  # refilled volumes are not checkpointed: rebuild them on resume
        self.progress.start(cfg.steps, "training", done=self.step)
        # --minutes: the bar and the remaining time follow the budget, not the step total
        self.progress.set_time_budget(budget, spent_s=self.elapsed)
        clock = RunClock(budget, self.elapsed, self.step, cfg.batch_size)
        last: dict[str, float] = {}
        stop = cancelled = False
        while self.step < cfg.steps and not stop:
            last = self.train_step()
            if self.validation is not None and self.dist.is_main:
                last |= self.validation.after_step(self.kept_model, self.step,
                                                   self.total_steps, self.progress.log)
            # the LR schedule's horizon follows the time budget (`schedule.RunClock`);
            # rank 0's horizon for all (below), so every rank applies the same lr from
            # the next step on
            rate, horizon = clock.after_step(self.step, cfg.steps)
            self.elapsed = clock.elapsed_s
            if self.step % cfg.log_every == 0 or self.step == cfg.steps or "val_loss" in last:
                log.write(self.step, {"step": self.step, "elapsed_s": round(self.elapsed, 2),
                                      "mmd_to_prior": self.mmd_to_prior(),
                                      "subtomos_per_s": rate} | last)
            if cfg.refill_every and self.step % cfg.refill_every == 0:
                self.refill()
            if self.step % cfg.checkpoint_every == 0:
                self.save()
            self.progress.advance(1, loss=last["loss"], rec=last["rec"],
                                  div=last.get("div", 0.0),
                                  **{k: v for k, v in last.items() if k == "val_loss"})
            spent = clock.spent or bool(
                self.validation and self.validation.stop)  # or the plateau, if asked
            # rank 0's horizon, cancellation and stop for every rank: one collective
            horizon, cancelled, stop = broadcast_ints(
                [horizon, self.progress.cancelled, self.progress.cancelled or spent],
                self.dist, self.device)
            if horizon >= 0:
                self.total_steps = horizon
        if cancelled:
            self.save()
            self.progress.finish()
            log.close()
            shutdown_distributed(self.dist)
            raise Cancelled(f"training cancelled at step {self.step}; its checkpoint is "
                            f"kept in {self.run_dir} (continue with --resume)")
        # model.pt's codes: of fresh subtomograms under the stored (averaged) weights
        # where a latent penalty shaped them; without one nothing reads them, so the
        # recent training codes are stored instead of an extra encoding pass
        codes = (self.fresh_codes(model=self.kept_model) if self.latent.active
                 else self.recent.codes()) if self.dist.is_main else None
        if self.family is not None and self.dist.is_main:
            self.family_figure = matching_figure(
                self.average.module, self.sampler, cfg, self.device, self.gen,
                self.family.gen, cfg.family.report_subtomograms)
            self.progress.log(describe(self.family_figure))
            log.write(self.step, {"step": self.step} | self.family_figure)
        self.save(codes)
        self.progress.finish()
        final = last | {"mmd_to_prior": self.mmd_to_prior(codes) if codes is not None
                        else float("nan")} | self.family_figure | (
            self.validation.summary() if self.validation is not None else {})
        log.close()
        shutdown_distributed(self.dist)
        return TrainResult(self.run_dir, self.dist.rank, self.step, self.elapsed, final,
                           self.sampler.mode, self.prior_check)


def train(sources: list[TomogramSource], cfg: TrainConfig, run_dir: str | Path,
          resume: bool = False, references: list[np.ndarray] | None = None,
          progress: ProgressReporter | None = None) -> TrainResult:
    """Train a restorer on `sources`; checkpoints and metrics go to `run_dir`."""
    return Trainer(sources, cfg, run_dir, resume, references, progress).run()


__all__ = ["TrainResult", "Trainer", "train"]
