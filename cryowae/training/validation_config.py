"""Settings of the held-out validation loss and the plateau rule (`TrainConfig.validation`).

A slab at the far end of each tomogram's longest lateral axis (Y or X), ``holdout`` of
that axis but at least one patch wide, is held out of training (`validation.py`); the
validation loss is the training task's reconstruction loss on ``crops`` fixed
subtomograms of it, every ``every`` steps. The plateau rule (`plateau.py`) runs on that
curve: a line through the logarithm of the loss's excess over its noise floor, fitted
over the last ``window`` tenths of the run (at least ``min_evals`` evaluations, from
``start`` of the run on); a plateau once it no longer falls by ``threshold`` per tenth.
The defaults come from the development runs on the simulations of seeds 61-65
(docs/benchmarks.md, "Plateau call"); on held-out seeds the call misses the step where
the restoration stops improving, mostly too early, so the later start is kept.
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
#: the plateau rule's settings; a config with ``smooth`` and without ``start`` holds the
#: keys of an earlier rule (a running median over ``smooth`` evaluations, ``window`` in
#: evaluations): they give way to today's defaults, so its runs resume
RULE_KEYS = ("smooth", "window", "threshold", "min_evals", "start")


@dataclass(frozen=True)
class ValidationSettings:
    """The held-out validation loss and the plateau rule (module docstring). Validated
    when made; bad values raise `CryowaeInputError`."""

    enabled: bool = True
    holdout: float = 0.1  # fraction of the longest lateral axis held out (>= one patch)
    crops: int = 8  # fixed held-out subtomograms the loss is averaged over
    every: int = 10  # steps between evaluations
    until_plateau: bool = False  # stop training at the plateau (the time/step budget caps)
    window: float = 3.0  # tenths of the run the slope is fitted over
    threshold: float = 0.05  # fall of the excess per tenth below which: plateau
    start: float = 0.5  # no plateau before this fraction of the run
    min_evals: int = 8  # evaluations the fit needs at least

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
        require_int(self.min_evals, "validation min_evals", 3)
        for name, ok, span in (("window", lambda v: 0 < v <= 10, "(0, 10]"),
                               ("threshold", lambda v: 0 < v < 1, "(0, 1)"),
                               ("start", lambda v: 0 <= v < 1, "[0, 1)")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not ok(v):
                raise CryowaeInputError(f"validation {name} must lie in {span}, got {v!r}")
        if self.until_plateau and not self.enabled:
            raise CryowaeInputError("--until-plateau needs the validation loss; do not "
                                    "turn validation off")

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
        if "smooth" in data and "start" not in data:
            data = {k: v for k, v in data.items() if k not in RULE_KEYS}
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


__all__ = ["HOLDOUT_KEYS", "RULE_KEYS", "ValidationSettings"]
