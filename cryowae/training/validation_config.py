"""Settings of the held-out validation loss and the plateau rule (`TrainConfig.validation`).

A slab at the far end of each tomogram's longest lateral axis (Y or X), ``holdout`` of
that axis but at least one patch wide, is held out of training (`validation.py`); the
validation loss is the training task's reconstruction loss on ``crops`` fixed
subtomograms of it, every ``every`` steps. The plateau rule (`plateau.py`) runs on that
curve: a running median over ``smooth`` evaluations, and a plateau once the smoothed
loss's excess over its noise floor improved by less than ``threshold`` (relative) over
the last ``window`` evaluations, after at least ``min_evals``. The defaults come from
the development run on the seed-60 simulation (docs/benchmarks.md, "Plateau call").
``until_plateau`` stops training there.

YAML (under ``train:``)::

    validation: {enabled: true, holdout: 0.1, crops: 8, every: 10, until_plateau: false}

``validation: false`` / ``validation: true`` are accepted as shorthands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from cryowae.errors import CryowaeInputError, require_int

#: settings a resumed run must share with its checkpoint (they decide which voxels train)
HOLDOUT_KEYS = ("enabled", "holdout", "crops")


@dataclass(frozen=True)
class ValidationSettings:
    """The held-out validation loss and the plateau rule (module docstring). Validated
    when made; bad values raise `CryowaeInputError`."""

    enabled: bool = True
    holdout: float = 0.1  # fraction of the longest lateral axis held out (>= one patch)
    crops: int = 8  # fixed held-out subtomograms the loss is averaged over
    every: int = 10  # steps between evaluations
    until_plateau: bool = False  # stop training at the plateau (the time/step budget caps)
    smooth: int = 3  # running-median width of the curve, evaluations
    window: int = 6  # evaluations over which the smoothed improvement is measured
    threshold: float = 0.02  # relative improvement over `window` below which: plateau
    min_evals: int = 8  # no plateau before this many evaluations

    def __post_init__(self) -> None:
        for name in ("enabled", "until_plateau"):
            if not isinstance(getattr(self, name), bool):
                raise CryowaeInputError(f"validation {name} must be true or false")
        h = self.holdout
        if isinstance(h, bool) or not isinstance(h, int | float) or not 0 < h < 0.5:
            raise CryowaeInputError(f"validation holdout must be a fraction in (0, 0.5), "
                                    f"got {h!r}")
        require_int(self.crops, "validation crops", 1, 1024)
        require_int(self.every, "validation every", 1)
        require_int(self.smooth, "validation smooth", 1)
        require_int(self.window, "validation window", 1)
        require_int(self.min_evals, "validation min_evals", 2)
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < 1:
            raise CryowaeInputError(f"validation threshold must lie in (0, 1), got {t!r}")
        if self.until_plateau and not self.enabled:
            raise CryowaeInputError("--until-plateau needs the validation loss; do not "
                                    "turn validation off")
        if self.min_evals < self.window + 1:
            raise CryowaeInputError("validation min_evals must exceed window (the rule "
                                    "compares the smoothed loss `window` evaluations back)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> ValidationSettings:
        """From a mapping (keys may use dashes), a bool (on/off with the defaults) or a
        `ValidationSettings`; unknown keys raise `CryowaeInputError`."""
        if isinstance(value, ValidationSettings):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise CryowaeInputError("validation must be a mapping of settings or true/false")
        data = {k.replace("-", "_"): v for k, v in value.items()}
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CryowaeInputError(f"unknown validation setting(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CryowaeInputError(f"validation: {exc}") from None

    @classmethod
    def of_saved_config(cls, saved: dict[str, Any]) -> ValidationSettings:
        """The validation of a stored training config: one written before validation
        existed (no ``validation`` key) trained on every voxel."""
        return cls.from_value(saved["validation"]) if "validation" in saved \
            else cls(enabled=False)


__all__ = ["HOLDOUT_KEYS", "ValidationSettings"]
