"""The validation loss of `train`: the training task on subtomograms held out of training.

Each tomogram is split along its longest lateral axis (X, or Y when Y is longer): the
last ``holdout`` of that axis, at least one patch wide, is the held-out slab; the rest
is what the `SubtomogramSampler` of training sees (`split_sources`), so no training
crop holds a held-out voxel. Both parts are views of the same memory-mapped volumes
(nothing is copied) and keep the whole volume's normalisation.

On the slabs, ``crops`` subtomograms are fixed once (`fixed_batches`): their positions
(a sampler with its own seed, structure-biased like training), the half of each pair
that is the input (noise2noise when the run has halves), the rotations and the extra
wedge (`make_batch` with a fixed generator). The validation loss is the training's
reconstruction term (`masked_fourier_loss`, the run's wedge weight) averaged over them,
without gradients, in eval mode (`ValidationMonitor.evaluate`): the same number for the
same weights, so its curve moves only with the model. With halves, the loss's noise
floor (the target half's noise, which no model removes) is estimated once from the
same crops; the plateau rule (`plateau.py`) measures the excess over it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.precision import autocast, to_layout
from cryowae.training.augment import TrainingBatch, make_batch
from cryowae.training.config import TrainConfig
from cryowae.training.data import SubtomogramSampler, TomogramSource
from cryowae.training.loss import masked_fourier_loss
from cryowae.training.plateau import has_plateaued, last_slope
from cryowae.training.validation_config import HOLDOUT_KEYS, ValidationSettings

#: seed offset of the held-out crops' positions, halves and rotations
_SEED_OFFSET = 104_729


class RegionView:
    """Array view of the box ``base[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]`` that reads
    only what is sliced (a zarr array loads whatever it is sliced by, so a view slice
    cannot be taken up front as it can of a memory map)."""

    def __init__(self, base: Any, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> None:
        self.base, self.lo = base, tuple(int(v) for v in lo)
        self.shape = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
        self.dtype = getattr(base, "dtype", np.dtype(np.float32))
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        out = []
        for k, off, n in zip(key, self.lo, self.shape, strict=True):
            if not isinstance(k, slice) or k.step not in (None, 1):
                raise IndexError("RegionView takes unit-step slices only")
            a, b, _ = k.indices(n)
            out.append(slice(off + a, off + max(a, b)))
        return np.asarray(self.base[tuple(out)])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self[:, :, :]
        return a if dtype is None else a.astype(dtype)


def _region(vol: Any, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> Any:
    if vol is None:
        return None
    if isinstance(vol, np.ndarray):  # a memory map's slice is a view: nothing is read
        return vol[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return RegionView(vol, lo, hi)


@dataclass(frozen=True)
class Holdout:
    """The held-out slab of one tomogram: voxels ``start:`` along `axis` (1 = Y, 2 = X)."""

    name: str
    axis: int
    start: int
    size: int  # the tomogram's extent along `axis`

    def describe(self) -> str:
        return f"{self.name} {'ZYX'[self.axis]} {self.start}:{self.size}"


def holdout_of(src: TomogramSource, settings: ValidationSettings, patch: int
               ) -> Holdout | None:
    """The slab to hold out of `src` (module docstring), or None when the rest would be
    narrower than a patch."""
    axis = 2 if src.shape[2] >= src.shape[1] else 1
    n = src.shape[axis]
    width = max(patch, math.ceil(settings.holdout * n))
    if n - width < patch:
        return None
    return Holdout(src.name, axis, n - width, n)


def _part(src: TomogramSource, lo: tuple[int, int, int], hi: tuple[int, int, int]
          ) -> TomogramSource:
    """`src` restricted to a box: views of its volumes, the same statistics, its
    structure map cut to the box's cells."""
    structure = None
    if src.structure is not None:
        b = src.shape[0] / max(src.structure.shape[0], 1)  # voxels per structure cell
        cells = [slice(int(a / b), max(int(a / b) + 1, int(c / b)))
                 for a, c in zip(lo, hi, strict=True)]
        structure = src.structure[tuple(cells)]
    return replace(src, full=_region(src.full, lo, hi), even=_region(src.even, lo, hi),
                   odd=_region(src.odd, lo, hi), stats=dict(src.stats),
                   structure=structure, refilled={})


def split_sources(sources: list[TomogramSource], settings: ValidationSettings, patch: int
                  ) -> tuple[list[TomogramSource], list[TomogramSource], list[Holdout]]:
    """(training parts, held-out parts, the slabs). Raises `CryowaeInputError` when a
    tomogram is too small to hold a slab out."""
    train, held, slabs = [], [], []
    for src in sources:
        slab = holdout_of(src, settings, patch)
        if slab is None:
            raise CryowaeInputError(
                f"{src.name}: shape {src.shape} is too small to hold out a validation slab "
                f"of at least one patch ({patch} voxels) and keep a patch for training "
                "(--until-plateau needs it; a smaller --patch-size fits)")
        hi = src.shape
        cut = tuple(slab.start if d == slab.axis else s for d, s in enumerate(hi))
        lo = tuple(slab.start if d == slab.axis else 0 for d in range(3))
        train.append(_part(src, (0, 0, 0), cut))  # type: ignore[arg-type]
        held.append(_part(src, lo, hi))  # type: ignore[arg-type]
        slabs.append(slab)
    return train, held, slabs


def fixed_batches(held: list[TomogramSource], cfg: TrainConfig, device: torch.device
                  ) -> tuple[list[TrainingBatch], float]:
    """The held-out subtomograms, cut, rotated and masked once (module docstring), in
    batches of the run's batch size, and the loss's noise floor.

    With even/odd halves A (input) and B (target) = s + n_A, s + n_B, the loss of any
    prediction p is E|F(p - s)|^2 + E|F(n_B)|^2 over the weighted target region; the
    second term, the floor, is half the same weighted power of F(A - B) = F(n_A - n_B)
    (independent halves of equal noise), both rotated as the batch is. Without halves
    the floor is 0 (the measured region's noise is not separable from the data)."""
    seed = cfg.seed + _SEED_OFFSET
    sampler = SubtomogramSampler(held, cfg.patch_size, cfg.structure_bias, seed=seed)
    inputs, targets = sampler.sample(cfg.validation.crops)
    gen = torch.Generator().manual_seed(seed)
    b, batches, floor = cfg.batch_size, [], 0.0
    for i in range(0, len(inputs), b):
        state = gen.get_state()
        batch = make_batch(inputs[i:i + b], targets[i:i + b], cfg.patch_size, cfg.geometry,
                           device, generator=gen)
        batches.append(batch)
        if sampler.noise2noise:  # the input half, rotated alike: the same rotations
            swapped = make_batch(targets[i:i + b], inputs[i:i + b], cfg.patch_size,
                                 cfg.geometry, device,
                                 generator=torch.Generator().set_state(state))
            diff, _ = masked_fourier_loss(swapped.targets, batch, cfg.wedge_weight)
            floor += 0.5 * float(diff) * batch.inputs.shape[0]
    return batches, floor / max(len(inputs), 1)


def validation_loss(model: torch.nn.Module, batches: list[TrainingBatch], wedge_weight: float,
                    device: torch.device, amp: bool | None = False, channels_last: bool = False
                    ) -> float:
    """The mean reconstruction loss of `model` on `batches` (weighted by their sizes),
    without gradients and in eval mode; the model's mode is put back afterwards."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for batch in batches:
                with autocast(device, amp):
                    restored = model(to_layout(batch.inputs, channels_last))[0]
                loss, _ = masked_fourier_loss(restored.float(), batch, wedge_weight)
                total += float(loss) * batch.inputs.shape[0]
                count += batch.inputs.shape[0]
    finally:
        model.train(was_training)
    return total / max(count, 1)


@dataclass
class ValidationMonitor:
    """The held-out loss of a run: when to evaluate, its history, the plateau call."""

    settings: ValidationSettings
    batches: list[TrainingBatch]
    slabs: list[Holdout]
    wedge_weight: float
    device: torch.device
    amp: bool | None = False
    channels_last: bool = False
    floor: float = 0.0  # the loss's noise floor (`fixed_batches`)
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    plateau_step: int | None = None
    seconds: float = 0.0  # wall-clock time spent evaluating in this session

    @classmethod
    def build(cls, sources: list[TomogramSource], cfg: TrainConfig, device: torch.device,
              log: Any = None) -> tuple[list[TomogramSource], ValidationMonitor | None]:
        """(the training parts of `sources`, the monitor); with validation off the
        sources themselves and None. A tomogram too small to hold a slab out turns
        validation off with one line to `log`, or raises `CryowaeInputError` under
        ``until_plateau``."""
        if not cfg.validation.enabled:
            return sources, None
        try:
            train, held, slabs = split_sources(sources, cfg.validation, cfg.patch_size)
        except CryowaeInputError as exc:
            if cfg.validation.until_plateau or log is None:
                raise
            log(f"warning: no validation loss: {exc}")
            return sources, None
        batches, floor = fixed_batches(held, cfg, device)
        return train, cls(cfg.validation, batches, slabs, cfg.wedge_weight, device,
                          cfg.amp, cfg.channels_last, floor=floor)

    def describe(self) -> str:
        n = sum(b.inputs.shape[0] for b in self.batches)
        return (f"validation: {n} fixed subtomograms held out of training (slab "
                + ", ".join(s.describe() for s in self.slabs)
                + f"), evaluated every {self.settings.every} steps; noise floor "
                + f"{self.floor:.4g}"
                + ("; training stops at the plateau" if self.settings.until_plateau else ""))

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0 and (not self.steps or self.steps[-1] != step)

    def evaluate(self, model: torch.nn.Module, step: int) -> float:
        """The validation loss of `model` at `step`, added to the history."""
        t0 = time.perf_counter()
        value = validation_loss(model, self.batches, self.wedge_weight, self.device,
                                self.amp, self.channels_last)
        self.seconds += time.perf_counter() - t0
        self.steps.append(int(step))
        self.values.append(value)
        return value

    def newly_plateaued(self, horizon: int) -> str | None:
        """The one line that says the curve has plateaued, the first time it has (the
        rule of `plateau.py` at the last evaluation, for a run of `horizon` steps);
        None otherwise."""
        if self.plateau_step is not None or not has_plateaued(
                self.steps, self.values, horizon, self.settings, self.floor):
            return None
        self.plateau_step = self.steps[-1]
        b = last_slope(self.steps, self.values, horizon, self.settings, self.floor)
        return (f"step {self.plateau_step}: the validation loss has plateaued "
                f"(val_loss {self.values[-1]:.4g}, noise floor {self.floor:.4g}; its excess "
                f"changes by {100 * b:+.1f}% per tenth of the {horizon}-step run over the "
                f"last {self.settings.window:g} tenths, threshold "
                f"{100 * self.settings.threshold:g}%)"
                + ("; stopping" if self.settings.until_plateau else ""))

    def after_step(self, model: torch.nn.Module, step: int, horizon: int, log: Any
                   ) -> dict[str, float]:
        """Evaluate when `step` is due: ``{"val_loss": value}`` (else empty), with the
        plateau line sent to `log` the first time the rule holds for a run of `horizon`
        steps (the learning-rate schedule's)."""
        if not self.due(step):
            return {}
        value = self.evaluate(model, step)
        said = self.newly_plateaued(horizon)
        if said:
            log(said)
        return {"val_loss": value}

    @property
    def stop(self) -> bool:
        """True when training should stop here: the plateau was called under
        ``until_plateau``."""
        return self.settings.until_plateau and self.plateau_step is not None

    def summary(self) -> dict[str, float]:
        """The last validation loss and the plateau's step (NaN before either)."""
        return {"val_loss": self.values[-1] if self.values else float("nan"),
                "plateau_step": float("nan") if self.plateau_step is None
                else float(self.plateau_step)}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values),
                "plateau_step": -1 if self.plateau_step is None else self.plateau_step,
                "slabs": [[s.name, s.axis, s.start, s.size] for s in self.slabs]}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The history of a checkpoint; its slabs must be this run's. A resumed run
        keeps the curve but may call the plateau again (more training was asked for)."""
        if not state:
            return
        slabs = [list(s) for s in state["slabs"]]
        mine = [[s.name, s.axis, s.start, s.size] for s in self.slabs]
        if slabs != mine:
            raise CryowaeInputError(f"--resume: the checkpoint held out {slabs} for "
                                    f"validation but this run would hold out {mine}")
        self.steps = [int(s) for s in state["steps"]]
        self.values = [float(v) for v in state["values"]]


def resumed_settings(saved: dict[str, Any], cfg: TrainConfig) -> TrainConfig:
    """`cfg` for resuming a checkpoint whose config is `saved`: validation off when the
    checkpoint trained without it (on every voxel); a change of what is held out raises
    `CryowaeInputError` (it would change the training data)."""
    was = ValidationSettings.of_saved_config(saved)
    if not was.enabled:
        return cfg.replace(validation=was) if cfg.validation.enabled else cfg
    for key in HOLDOUT_KEYS:
        if getattr(was, key) != getattr(cfg.validation, key):
            raise CryowaeInputError(
                f"--resume: validation {key} was {getattr(was, key)!r} in the checkpoint "
                f"but is {getattr(cfg.validation, key)!r} now; resume with the same "
                "settings")
    return cfg


__all__ = ["Holdout", "RegionView", "ValidationMonitor", "fixed_batches", "holdout_of",
           "resumed_settings", "split_sources", "validation_loss"]
