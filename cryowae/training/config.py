"""Training configuration: a dataclass with nested settings objects, YAML presets in
configs/, CLI overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cryowae.errors import CryowaeInputError
from cryowae.models.restorer import RestorerConfig
from cryowae.physics.geometry import DEFAULT_TILT_RANGE, TiltGeometry
from cryowae.training.family_config import FamilySettings
from cryowae.training.validation_config import ValidationSettings

#: the flat keys of older configs and checkpoints that now live in `TrainConfig.restorer`
RESTORER_KEYS = tuple(f.name for f in fields(RestorerConfig))
#: the flat keys of older configs and checkpoints that now live in `TrainConfig.geometry`
#: (flat name -> `TiltGeometry` field)
GEOMETRY_KEYS = {"tilt_min": "tilt_min", "tilt_max": "tilt_max", "tilt_axis": "axis"}


@dataclass
class TrainConfig:
    """Everything a training run needs besides its input files, validated when made.

    Sizes are in voxels, angles in degrees, times in minutes. The architecture is a
    nested `RestorerConfig` (`restorer`) and the tilt geometry a `TiltGeometry`
    (`geometry`). `from_dict` (YAML presets, ``config.yaml`` of a run, checkpoints)
    reads the nested form::

        patch_size: 48
        restorer: {channels: 12, depth: 3, latent_dim: 32}
        geometry: {tilt_min: -60, tilt_max: 60, axis: y}

    and still reads the flat keys of older files (``channels``, ``depth``,
    ``latent_dim``, ``encoder``, ``skip``, ``skip_sigma``, ``tilt_min``, ``tilt_max``,
    ``tilt_axis`` at the top level), so existing YAML files and format-1 checkpoints keep
    working; `replace` accepts the flat names too. ``patch_size`` stays a training
    setting. The posterior-family branch is the nested `FamilySettings` (``family``,
    on by default; a file without the key gets the default). The held-out validation
    loss and its plateau rule are the nested `ValidationSettings` (``validation``).
    """

    patch_size: int = 64
    restorer: RestorerConfig = field(default_factory=RestorerConfig)
    # optimisation
    batch_size: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    steps: int = 200
    minutes: float | None = None  # wall-clock budget; stops at whichever comes first
    grad_clip: float = 1.0
    # decay of the running average of the weights (`averaging.py`) that validation
    # scores and model.pt stores: about the last 1/(1 - ema_decay) steps (0: the last
    # step's weights)
    ema_decay: float = 0.99
    # self-supervision
    wedge_weight: float = 4.0  # loss weight of the missing-wedge region vs. measured
    structure_bias: float = 0.7  # fraction of subtomograms drawn from structured regions
    refill_every: int = 0  # refill the stored inputs' wedges with predictions (0: never)
    # latent matching of the mean path's codes: off by default, since the decoder
    # ignores z (codes varied at sampling moved the output by about 1% of its std) and
    # nothing downstream reads the matched codes, while restoration without it was at
    # least as good (docs/benchmarks.md, "Earlier posterior families: code samplers" and
    # "IMQ-MMD over 10 minutes"); mmd, sinkhorn, sliced or adversarial by option
    divergence: str = "none"
    kernel: str = "imq"
    lambda_: float = 1.0  # relative weight after automatic balancing (see loss.py)
    balance_steps: int = 10  # steps over which the term scales are measured
    blur: float = 4.0  # Sinkhorn blur, relative to the prior sigma (see divergences)
    scaling: float = 0.9  # Sinkhorn epsilon-scaling
    sinkhorn_p: int = 1  # Sinkhorn cost |x-y|^p: 1 (energy-distance limit) or 2
    n_projections: int = 128  # sliced Wasserstein
    bank_size: int = 1024  # memory bank of recent encoder features (0: minibatch only)
    bank_grad: bool = False  # let the penalty's gradient reach the head through the bank
    bank_centering: bool = True  # re-centre the banked codes on the batch mean (latent.py)
    bank_value_scaling: bool | None = None  # N/B on the value weight; None: divergence's
    init_codes: int = 0  # subtomograms that set the codes' initial scale (0: off)
    prior: str = "gaussian"  # or "reference"
    prior_sigma: float = 1.0
    check_prior_preference: bool = True
    # tilt geometry of the training data
    geometry: TiltGeometry = field(default_factory=TiltGeometry)
    # the posterior-family branch (`family_config.FamilySettings`; on by default)
    family: FamilySettings = field(default_factory=FamilySettings)
    # the held-out validation loss and the plateau rule (`validation_config`; on)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast (cryowae.precision.amp_active); None: device default
    channels_last: bool = False  # channels_last_3d weights and inputs
    compile: bool = False  # torch.compile the network (eager fallback on failure)
    compile_backend: str = "inductor"
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    log_every: int = 5
    checkpoint_every: int = 25
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.restorer, dict):
            self.restorer = RestorerConfig.from_dict(self.restorer)
        if isinstance(self.geometry, dict):
            self.geometry = TiltGeometry.from_dict(self.geometry)
        if not isinstance(self.family, FamilySettings):
            self.family = FamilySettings.from_value(self.family)
        if not isinstance(self.validation, ValidationSettings):
            self.validation = ValidationSettings.from_value(self.validation)
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain values (nested dicts for `restorer` and `geometry`) for YAML and
        checkpoints."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["restorer"] = self.restorer.to_dict()
        out["geometry"] = self.geometry.to_dict()
        out["family"] = self.family.to_dict()
        out["validation"] = self.validation.to_dict()
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config from plain values: nested or flat (see the class docstring). Keys may
        use dashes; ``lambda`` means ``lambda_``. Unknown keys, a key given both flat and
        nested with different values, and invalid values raise `CryowaeInputError`
        naming `source`."""
        return cls._build(data, source, flat_wins=False)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes` (None values ignored); flat architecture and tilt keys
        (``latent_dim=32``, ``tilt_axis="x"``) change the nested settings."""
        changes = {k: v for k, v in changes.items() if v is not None}
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainConfig._build(current | changes, "options", flat_wins=True)

    @classmethod
    def _build(cls, data: dict[str, Any], source: str, flat_wins: bool) -> TrainConfig:
        data = {("lambda_" if k in ("lambda", "lambda_") else k.replace("-", "_")): v
                for k, v in data.items()}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - set(RESTORER_KEYS) - set(GEOMETRY_KEYS))
        if unknown:
            raise CryowaeInputError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        nested_r, nested_g = data.pop("restorer", None), data.pop("geometry", None)
        flat_r = {k: data.pop(k) for k in RESTORER_KEYS if k in data}
        flat_g = {GEOMETRY_KEYS[k]: data.pop(k) for k in GEOMETRY_KEYS if k in data}
        try:
            if nested_r is not None or flat_r:
                data["restorer"] = _restorer_from(nested_r, flat_r, flat_wins)
            if nested_g is not None or flat_g:
                data["geometry"] = _geometry_from(nested_g, flat_g, flat_wins, source)
            return cls(**data)
        except CryowaeInputError as exc:
            msg = str(exc).removeprefix("config: ")
            raise CryowaeInputError(msg if msg.startswith(f"{source}:")
                                    else f"{source}: {msg}") from None
        except (TypeError, ValueError) as exc:
            raise CryowaeInputError(f"{source}: {exc}") from None

    def validate(self, source: str = "config") -> None:
        """Raise `CryowaeInputError` (naming `source`) for settings no run can use."""
        from cryowae.divergences.registry import DIVERGENCES

        if not isinstance(self.restorer, RestorerConfig):
            raise CryowaeInputError(f"{source}: restorer must be a RestorerConfig")
        if not isinstance(self.geometry, TiltGeometry):
            raise CryowaeInputError(f"{source}: geometry must be a TiltGeometry")
        m = 2**self.restorer.depth
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
        if not 8 <= self.restorer.latent_dim <= 256:
            raise CryowaeInputError(f"{source}: latent_dim must lie in 8..256")
        if self.batch_size < 1 or self.steps < 1:
            raise CryowaeInputError(f"{source}: batch_size and steps must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CryowaeInputError(f"{source}: ema_decay must lie in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise CryowaeInputError(f"{source}: unknown device {self.device!r}")


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if not isinstance(value, dict):
        raise CryowaeInputError(f"{what} must be a mapping of settings")
    return dict(value)


def _combine(nested: dict[str, Any], flat: dict[str, Any], flat_wins: bool,
             what: str) -> dict[str, Any]:
    """`nested` updated by `flat`; unless `flat_wins`, a key given both ways must agree."""
    for k, v in flat.items():
        if not flat_wins and k in nested and nested[k] != v:
            raise CryowaeInputError(f"{k} given both flat ({v!r}) and under {what} "
                                    f"({nested[k]!r})")
    return nested | flat


def _restorer_from(nested: Any, flat: dict[str, Any], flat_wins: bool) -> RestorerConfig:
    if isinstance(nested, RestorerConfig) and not flat:
        return nested
    merged = _combine(_mapping(nested or {}, "restorer"), flat, flat_wins, "restorer")
    return RestorerConfig.from_dict(merged)


def _geometry_from(nested: Any, flat: dict[str, Any], flat_wins: bool,
                   source: str) -> TiltGeometry:
    if isinstance(nested, TiltGeometry) and not flat:
        return nested
    given = _mapping(nested or {}, "geometry")
    if "tilt_axis" in given:  # the old key inside the nested form
        given["axis"] = given.pop("tilt_axis")
    merged = _combine(given, flat, flat_wins, "geometry")
    unknown = sorted(set(merged) - {"tilt_min", "tilt_max", "axis", "source"})
    if unknown:
        raise CryowaeInputError(f"unknown geometry setting(s) {', '.join(unknown)}")
    lo, hi = DEFAULT_TILT_RANGE
    return TiltGeometry.from_dict({"tilt_min": lo, "tilt_max": hi, "source": source}
                                  | merged)


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
    if not isinstance(data, dict):
        raise CryowaeInputError(f"{source}: 'train' must be a mapping of settings")
    return TrainConfig.from_dict(data, source)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML (``train:`` mapping, nested form), atomically."""
    from cryowae.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump({"train": cfg.to_dict()}, sort_keys=False))
