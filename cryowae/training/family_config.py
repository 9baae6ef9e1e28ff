"""Settings of the posterior-family branch of training (`TrainConfig.family`).

The branch is a `cryowae.models.stochastic.StochasticRestorer` around the mean path:
its architecture options (``latent_channels``, ``level_noise``, ``branch_channels``,
``summary_dim``) live here, the mean path's in `TrainConfig.restorer`;
`FamilySettings.stochastic_config` joins them. The training options: ``samples`` per
input m (1 is the squared-error ablation), the energy-score ``score`` variant
(`cryowae.training.scoring.VARIANTS`), its relative ``weight`` (scale-free: balanced
against the mean path's loss like the latent term, `TermBalancer`), the posterior
branch with WAE ``posterior_matching`` and its ``matching_divergence``, the number
of each batch's patches the branch trains on (``branch_batch``) and how often (every
``branch_every``-th step), and the ``noise`` source of the simulated target noise
(``auto``: even/odd halves when the run has them, else the single-tomogram estimate;
``halves``; ``estimate``).

YAML (under ``train:``)::

    family: {enabled: true, samples: 2, score: shell_regions, posterior_matching: false}

``family: false`` / ``family: true`` are accepted as shorthands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cryowae.errors import CryowaeInputError, require_int
from cryowae.models.restorer import RestorerConfig
from cryowae.models.stochastic import StochasticConfig

NOISE_SOURCES = ("auto", "halves", "estimate")
#: divergences the joint latent matching may use (the registry's, without ``none``:
#: turn ``posterior_matching`` off instead)
MATCHING_DIVERGENCES = ("mmd", "sinkhorn", "sliced", "adversarial")
#: settings a resumed run must share with its checkpoint (the branch's architecture)
ARCHITECTURE_KEYS = ("enabled", "latent_channels", "level_noise", "branch_channels",
                     "summary_dim", "posterior_matching")


@dataclass(frozen=True)
class FamilySettings:
    """The family branch: on/off, training options and branch architecture (module
    docstring). Validated when made; bad values raise `CryowaeInputError`."""

    enabled: bool = True
    samples: int = 2  # m: samples per input (1: the squared-error ablation)
    # patches of each batch the branch trains on (0: all). The branch's m decodes cost
    # about as much as the mean path's step: on all 4 patches of the cpu-small batch a
    # 10-minute run made 126 steps instead of 255 (docs/benchmarks.md), so the mean
    # path, and the single restoration, lost half its training
    branch_batch: int = 1
    # the branch trains on every k-th step only (its own RNG stream and optimiser
    # state: the mean path's steps are the same either way). On every step it cost the
    # mean path a fifth of its steps in a fixed time (205 against 255 in 10 minutes)
    # and the single restoration 0.005-0.053 Pearson on seeds 10-12
    # (docs/benchmarks.md); the spread is calibrated after sampling anyway
    branch_every: int = 4
    score: str = "shell_regions"
    weight: float = 1.0  # relative to the mean path's loss, after balancing
    # off by default: in the quick measurement (docs/architecture.md, Posterior
    # families) the branch without it calibrated better per CPU minute
    posterior_matching: bool = False
    matching_divergence: str = "mmd"
    matching_weight: float = 1.0  # relative to the posterior branch's reconstruction
    noise: str = "auto"
    latent_channels: int = 8
    level_noise: int = 0
    branch_channels: int = 8
    summary_dim: int = 4
    report_subtomograms: int = 32  # fresh subtomograms for the final matching figure

    def __post_init__(self) -> None:
        from cryowae.training.scoring import VARIANTS

        if not isinstance(self.enabled, bool) or not isinstance(self.posterior_matching,
                                                                bool):
            raise CryowaeInputError("family enabled and posterior_matching must be true "
                                    "or false")
        require_int(self.samples, "family samples", 1, 16)
        require_int(self.branch_batch, "family branch_batch", 0)
        require_int(self.branch_every, "family branch_every", 1)
        if self.score not in VARIANTS:
            raise CryowaeInputError(f"unknown family score {self.score!r} (choose from "
                                    f"{', '.join(VARIANTS)})")
        if self.matching_divergence not in MATCHING_DIVERGENCES:
            raise CryowaeInputError(
                f"unknown matching divergence {self.matching_divergence!r} (choose from "
                f"{', '.join(MATCHING_DIVERGENCES)})")
        if self.noise not in NOISE_SOURCES:
            raise CryowaeInputError(f"unknown family noise source {self.noise!r} (choose "
                                    f"from {', '.join(NOISE_SOURCES)})")
        for name in ("weight", "matching_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise CryowaeInputError(f"family {name} must be a positive number")
        if isinstance(self.report_subtomograms, bool) or not isinstance(
                self.report_subtomograms, int) or self.report_subtomograms < 1:
            raise CryowaeInputError("family report_subtomograms must be a positive integer")
        # the architecture fields are checked by StochasticConfig
        self.stochastic_config(RestorerConfig())

    def stochastic_config(self, restorer: RestorerConfig) -> StochasticConfig:
        """The `StochasticConfig` of the branch around the mean path `restorer`."""
        return StochasticConfig(restorer=restorer, latent_channels=self.latent_channels,
                                level_noise=self.level_noise,
                                branch_channels=self.branch_channels,
                                posterior=self.posterior_matching,
                                summary_dim=self.summary_dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> FamilySettings:
        """From a mapping (keys may use dashes), a bool (on/off with the defaults) or a
        `FamilySettings`; unknown keys raise `CryowaeInputError`."""
        if isinstance(value, FamilySettings):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise CryowaeInputError("family must be a mapping of settings or true/false")
        data = {k.replace("-", "_"): v for k, v in value.items()}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CryowaeInputError(f"unknown family setting(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CryowaeInputError(f"family: {exc}") from None

    @classmethod
    def of_saved_config(cls, saved: dict[str, Any]) -> FamilySettings:
        """The family of a stored training config: a config written before the branch
        existed (no ``family`` key) trained without it."""
        return cls.from_value(saved["family"]) if "family" in saved else cls(enabled=False)


__all__ = ["ARCHITECTURE_KEYS", "MATCHING_DIVERGENCES", "NOISE_SOURCES", "FamilySettings"]
