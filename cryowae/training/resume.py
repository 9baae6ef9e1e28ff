"""What ``checkpoint.pt`` holds for ``cryowae train --resume``, and how it is put back.

The state is plain (`cryowae.models.checkpoint.check_plain`): weights and optimiser
state (tensors and numbers), the step and elapsed seconds, the config as a plain dict,
the code banks, the balancer's figures, the divergence's and prior's state, and the RNG
states (torch's as uint8 tensors, numpy's bit generator as a dict of integers); with
the family branch also its weights, generator, balancers and divergence (``family``).
Files of format 1 (flat config) are read too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cryowae.divergences import CodeBank
from cryowae.errors import CryowaeInputError
from cryowae.models.restorer import WAERestorer
from cryowae.training.config import TrainConfig
from cryowae.training.data import SubtomogramSampler
from cryowae.training.family_config import ARCHITECTURE_KEYS, FamilySettings
from cryowae.training.latent import LatentMatcher
from cryowae.training.loss import TermBalancer

#: settings a resumed run must share with its checkpoint
RESUME_KEYS = ("patch_size", "restorer", "divergence")


@dataclass
class RunState:
    """The parts of a run that `checkpoint.pt` saves and restores."""

    model: WAERestorer
    opt: torch.optim.Optimizer
    latent: LatentMatcher
    recent: CodeBank
    balancer: TermBalancer
    sampler: SubtomogramSampler
    generator: torch.Generator
    family: Any = None  # a `cryowae.training.family_step.FamilyTrainer`, or None
    average: Any = None  # a `cryowae.training.averaging.WeightAverage`, or None


def run_state_dict(run: RunState, cfg: TrainConfig, step: int,
                   elapsed: float) -> dict[str, Any]:
    """Everything `restore_run_state` needs, as plain values."""
    return {
        "weights": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
        "optimizer": run.opt.state_dict(), "step": int(step), "elapsed": float(elapsed),
        "config": cfg.to_dict(), "recent": run.recent.state_dict(),
        "balancer": run.balancer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "gen": run.generator.get_state(),
                "numpy": run.sampler.rng.bit_generator.state},
    } | run.latent.state_dict() | (
        {"family": run.family.state_dict()} if run.family is not None else {}) | (
        {"average": run.average.state_dict()} if run.average is not None else {})


def adopt_saved_family(saved: dict[str, Any], cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the family turned off when the checkpoint's config (`saved`) predates
    the family branch (no ``family`` key: it trained without one)."""
    if "family" not in saved and cfg.family.enabled:
        return cfg.replace(family=FamilySettings(enabled=False))
    return cfg


def check_same_settings(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Raise `CryowaeInputError` if the checkpoint's config (`saved`, nested or flat)
    differs from `cfg` in a setting that a resumed run cannot change."""
    old = TrainConfig.from_dict(saved, "checkpoint config")
    for key in RESUME_KEYS:
        was, now = getattr(old, key), getattr(cfg, key)
        if was != now:
            raise CryowaeInputError(
                f"--resume: {key} was {_show(was)} in the checkpoint but is {_show(now)} "
                "now; resume with the same settings")
    was_f, now_f = FamilySettings.of_saved_config(saved), cfg.family
    for key in ARCHITECTURE_KEYS:
        if getattr(was_f, key) != getattr(now_f, key):
            raise CryowaeInputError(
                f"--resume: family {key} was {getattr(was_f, key)!r} in the checkpoint but "
                f"is {getattr(now_f, key)!r} now; resume with the same settings")


def _show(value: Any) -> str:
    return repr(value.to_dict()) if hasattr(value, "to_dict") else repr(value)


def restore_run_state(run: RunState, state: dict[str, Any]) -> tuple[int, float]:
    """Put a checkpoint's state back into `run`; returns (step, elapsed seconds)."""
    try:
        run.model.load_state_dict(state["weights"])
        run.opt.load_state_dict(state["optimizer"])
        run.latent.load_state_dict(state)
        run.recent.load_state_dict(state["recent"])
        run.balancer.load_state_dict(state["balancer"])
        torch.set_rng_state(state["rng"]["torch"])
        run.generator.set_state(state["rng"]["gen"])
        run.sampler.rng.bit_generator.state = state["rng"]["numpy"]
        if run.family is not None:
            run.family.load_state_dict(state["family"])
        if run.average is not None:
            run.average.load_state_dict(state.get("average"))
        return int(state["step"]), float(state["elapsed"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CryowaeInputError(f"--resume: checkpoint does not fit this run "
                                f"({type(exc).__name__}: {str(exc)[:80]})") from None


__all__ = ["RESUME_KEYS", "RunState", "check_same_settings", "restore_run_state",
           "run_state_dict"]
