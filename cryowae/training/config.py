"""Training configuration: a dataclass, YAML presets in configs/, CLI overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cryowae.errors import CryowaeInputError


@dataclass
class TrainConfig:
    """Everything a training run needs besides its input files.

    Sizes are in voxels, angles in degrees, times in minutes.
    """

    # restorer architecture
    patch_size: int = 64
    channels: int = 16
    depth: int = 3
    latent_dim: int = 64
    encoder: str = "deterministic"
    skip: str = "lowpass"  # restored = skip(input) + correction: "lowpass" or "identity"
    skip_sigma: float = 1.0  # initial width of the low-pass skip filter (voxels)
    # optimisation
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 200
    minutes: float | None = None  # wall-clock budget; stops at whichever comes first
    grad_clip: float = 1.0
    # self-supervision
    wedge_weight: float = 4.0  # loss weight of the missing-wedge region vs. measured
    structure_bias: float = 0.7  # fraction of subtomograms drawn from structured regions
    refill_every: int = 0  # refill the stored inputs' wedges with predictions (0: never)
    # latent matching
    divergence: str = "mmd"
    kernel: str = "imq"
    lambda_: float = 1.0  # relative weight after automatic balancing (see loss.py)
    balance_steps: int = 10  # steps over which the term scales are measured
    blur: float = 4.0  # Sinkhorn blur, relative to the prior sigma (see divergences)
    scaling: float = 0.9  # Sinkhorn epsilon-scaling
    sinkhorn_p: int = 1  # Sinkhorn cost |x-y|^p: 1 (energy-distance limit) or 2
    n_projections: int = 128  # sliced Wasserstein
    bank_size: int = 1024  # memory bank of recent encoder features (0: minibatch only)
    bank_grad: bool = False  # let the penalty's gradient reach the head through the bank
    bank_centering: bool = True  # re-centre the banked codes on the batch mean (loop.py)
    bank_value_scaling: bool | None = None  # N/B on the value weight; None: divergence's
    init_codes: int = 0  # subtomograms that set the codes' initial scale (0: off)
    prior: str = "gaussian"  # or "reference"
    prior_sigma: float = 1.0
    check_prior_preference: bool = True
    # geometry
    tilt_min: float = -60.0
    tilt_max: float = 60.0
    tilt_axis: str = "y"
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    log_every: int = 5
    checkpoint_every: int = 25
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        names = {f.name for f in fields(cls)}
        data = {("lambda_" if k in ("lambda", "lambda_") else k.replace("-", "_")): v
                for k, v in data.items()}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CryowaeInputError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        cfg = cls(**data)
        cfg.validate(source)
        return cfg

    def replace(self, **changes: Any) -> TrainConfig:
        changes = {k: v for k, v in changes.items() if v is not None}
        return TrainConfig.from_dict(self.to_dict() | changes, "options")

    def validate(self, source: str = "config") -> None:
        from cryowae.divergences.registry import DIVERGENCES
        from cryowae.models.restorer import SKIPS

        m = 2**self.depth
        if self.patch_size < 16 or self.patch_size % m:
            raise CryowaeInputError(
                f"{source}: patch_size {self.patch_size} must be >= 16 and a multiple of {m}")
        if self.divergence not in DIVERGENCES:
            raise CryowaeInputError(f"{source}: unknown divergence {self.divergence!r} "
                                    f"(choose from {', '.join(DIVERGENCES)})")
        if self.kernel not in ("imq", "rbf"):
            raise CryowaeInputError(f"{source}: unknown kernel {self.kernel!r} (imq or rbf)")
        if self.prior not in ("gaussian", "reference"):
            raise CryowaeInputError(f"{source}: unknown prior {self.prior!r}")
        if self.skip not in SKIPS:
            raise CryowaeInputError(f"{source}: unknown skip {self.skip!r} "
                                    f"({' or '.join(SKIPS)})")
        if self.encoder not in ("deterministic", "gaussian"):
            raise CryowaeInputError(f"{source}: unknown encoder {self.encoder!r}")
        if not 8 <= self.latent_dim <= 256:
            raise CryowaeInputError(f"{source}: latent_dim must lie in 8..256")
        if self.batch_size < 1 or self.steps < 1:
            raise CryowaeInputError(f"{source}: batch_size and steps must be positive")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CryowaeInputError(f"{source}: unknown device {self.device!r}")
        from cryowae.physics.wedge import check_tilt_range

        check_tilt_range(self.tilt_min, self.tilt_max)


PRESETS = ("cpu-small", "gpu-default", "gpu-large")


def load_config(path_or_preset: str | os.PathLike | None) -> TrainConfig:
    """Load a YAML file, or a preset name shipped in configs/ (default: cpu-small)."""
    name = str(path_or_preset) if path_or_preset else "cpu-small"
    p = Path(name)
    if p.suffix.lower() in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise CryowaeInputError(f"{p}: no such config file")
        text, source = p.read_text(errors="replace"), str(p)
    else:
        res = resources.files("cryowae.configs") / f"{name}.yaml"
        if not res.is_file():
            raise CryowaeInputError(
                f"unknown config {name!r}: give a YAML file or one of {', '.join(PRESETS)}")
        text, source = res.read_text(), f"preset {name}"
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise CryowaeInputError(f"{source}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise CryowaeInputError(f"{source}: expected a mapping of settings")
    data = data.get("train", data)
    return TrainConfig.from_dict(data, source)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    from cryowae.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"train": cfg.to_dict()}, sort_keys=False))
