"""Tilt geometry of a tomogram: the one settings object every command accepts.

A tilt series is recorded about one axis (Y by default, X for some set-ups) over a
limited range of angles (degrees); the directions outside that range form the missing
wedge of Fourier space (`cryowae.physics.wedge`). `TiltGeometry` is validated once,
when it is made, and travels whole: into training, into ``model.pt``, into restoration,
sampling, evaluation, simulation and the napari plugin.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cryowae.physics.wedge import TILT_AXES, check_tilt_axis, check_tilt_range, wedge_mask

if TYPE_CHECKING:
    from cryowae.physics.wedge_estimate import WedgeEstimate

#: the tilt range assumed when nothing says otherwise (degrees)
DEFAULT_TILT_RANGE = (-60.0, 60.0)
#: tilt-file suffixes looked for next to a tomogram
TILT_FILE_SUFFIXES = (".tlt", ".rawtlt")


@dataclass(frozen=True)
class TiltGeometry:
    """The measured angular range of a single-axis tilt series.

    Attributes
    ----------
    tilt_min, tilt_max
        Lowest and highest tilt angle, degrees, -90 < tilt_min < tilt_max < 90.
    axis
        Tilt axis, ``"y"`` or ``"x"`` (upper case is accepted and stored lower case).
    source
        Where the geometry came from (``"options"``, ``"tilt file PATH"``, ``"model"``,
        ``"default"``...): shown to the user, not compared.
    """

    tilt_min: float = DEFAULT_TILT_RANGE[0]
    tilt_max: float = DEFAULT_TILT_RANGE[1]
    axis: str = "y"
    source: str = field(default="default", compare=False)

    def __post_init__(self) -> None:
        lo, hi = float(self.tilt_min), float(self.tilt_max)
        check_tilt_range(lo, hi)
        axis = check_tilt_axis(self.axis)
        object.__setattr__(self, "tilt_min", lo)
        object.__setattr__(self, "tilt_max", hi)
        object.__setattr__(self, "axis", axis)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_range(cls, tilt_min: float, tilt_max: float, axis: str = "y",
                   source: str = "options") -> TiltGeometry:
        """A geometry from a tilt range in degrees."""
        return cls(tilt_min, tilt_max, axis, source)

    @classmethod
    def from_file(cls, path: str | os.PathLike, axis: str = "y") -> TiltGeometry:
        """A geometry from a ``.tlt`` / ``.rawtlt`` file (one angle in degrees a line)."""
        from cryowae.io.tilts import read_tilt_angles

        a = read_tilt_angles(path)
        return cls(float(a.min()), float(a.max()), axis, f"tilt file {path}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TiltGeometry:
        """Inverse of `to_dict`; also reads the flat keys of older checkpoints
        (``tilt_min``, ``tilt_max``, ``tilt_axis``)."""
        axis = data.get("axis", data.get("tilt_axis", "y"))
        return cls(float(data["tilt_min"]), float(data["tilt_max"]), str(axis),
                   str(data.get("source", "model")))

    @classmethod
    def resolve(cls, *, tilt_min: float | None = None, tilt_max: float | None = None,
                tilt_file: str | os.PathLike | None = None, axis: str | None = None,
                tomogram: str | os.PathLike | None = None,
                fallback: TiltGeometry | None = None,
                estimate: bool = False) -> TiltGeometry:
        """The geometry a command should use, from (in this order): a tilt file, the
        tilt-range options (a missing end taken from the default -60..60), a tilt file
        next to `tomogram` (``<stem>.tlt``, ``<stem>.rawtlt``, ``tilts.tlt``), the
        `fallback` (e.g. the model's training geometry), with `estimate` the range the
        tomogram's own spectrum shows (`cryowae.physics.wedge_estimate`, when reliable
        and not Y/Z-swapped; its source starts with ``"estimated"``), else the default
        -60..60 with ``source="default"`` so that the caller can warn."""
        ax = axis if axis is not None else (fallback.axis if fallback is not None else "y")
        if tilt_file is not None:
            return cls.from_file(tilt_file, ax)
        if tilt_min is not None or tilt_max is not None:
            lo = DEFAULT_TILT_RANGE[0] if tilt_min is None else float(tilt_min)
            hi = DEFAULT_TILT_RANGE[1] if tilt_max is None else float(tilt_max)
            return cls(lo, hi, ax, "options")
        if tomogram is not None:
            found = find_tilt_file(tomogram)
            if found is not None:
                return cls.from_file(found, ax)
        if fallback is not None:
            return cls(fallback.tilt_min, fallback.tilt_max, ax, fallback.source)
        if estimate and tomogram is not None:
            from cryowae.physics.wedge_estimate import estimate_wedge_file

            est = estimate_wedge_file(tomogram)
            if est.reliable and not est.swapped:
                return est.geometry(axis or est.axis)
        return cls(*DEFAULT_TILT_RANGE, ax, "default")

    # ------------------------------------------------------------------ views
    @property
    def tilt_range(self) -> tuple[float, float]:
        """(tilt_min, tilt_max) in degrees."""
        return self.tilt_min, self.tilt_max

    @property
    def span(self) -> float:
        """Measured angular span, degrees."""
        return self.tilt_max - self.tilt_min

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON, YAML and checkpoints."""
        return {"tilt_min": self.tilt_min, "tilt_max": self.tilt_max, "axis": self.axis}

    def describe(self) -> str:
        """One line for logs: ``-60..60 degrees about Y (tilt file x.tlt)``."""
        return (f"{self.tilt_min:g}..{self.tilt_max:g} degrees about {self.axis.upper()} "
                f"({self.source})")

    def wedge_mask(self, shape: tuple[int, ...], rfft: bool = True,
                   device: torch.device | str | None = None) -> torch.Tensor:
        """The measured-region mask of a (Z, Y, X) grid (`cryowae.physics.wedge`)."""
        return wedge_mask(shape, self.tilt_min, self.tilt_max, self.axis, rfft=rfft,
                          device=device)


#: degrees by which either end of a tilt range may differ before a warning
GEOMETRY_TOLERANCE_DEG = 10.0


def geometry_mismatch(data: TiltGeometry, model: TiltGeometry,
                      tolerance: float = GEOMETRY_TOLERANCE_DEG) -> str | None:
    """A one-line warning when a tomogram's geometry is not the one a model was trained
    on (axis differs, or an end of the range by more than `tolerance` degrees), else
    None. The restorer learned to fill its training wedge; another wedge is filled
    poorly or not at all."""
    if data.axis != model.axis:
        return (f"warning: this tomogram was tilted about {data.axis.upper()} "
                f"({data.source}) but the model was trained on tilts about "
                f"{model.axis.upper()}; retrain on data of this geometry")
    off = max(abs(data.tilt_min - model.tilt_min), abs(data.tilt_max - model.tilt_max))
    if off <= tolerance:
        return None
    return (f"warning: tilt range {data.tilt_min:g}..{data.tilt_max:g} degrees "
            f"({data.source}) differs from the model's training range "
            f"{model.tilt_min:g}..{model.tilt_max:g} by {off:g} degrees; the missing "
            "wedge will be filled less well (retrain on data of this geometry)")


def _close(a: tuple[float, float], b: tuple[float, float], tolerance: float) -> bool:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= tolerance


def estimate_mismatch(given: TiltGeometry, estimate: WedgeEstimate, name: str = "",
                      tolerance: float = GEOMETRY_TOLERANCE_DEG) -> str | None:
    """A one-line warning, naming the likely cause, when the geometry a command uses
    disagrees with what the tomogram's own spectrum shows (`estimate`, from
    `cryowae.physics.wedge_estimate`): the tilt axis, or an end of the range by more
    than `tolerance` degrees. None when they agree or the estimate is not reliable."""
    if not estimate.reliable:
        return None
    est = (estimate.tilt_min, estimate.tilt_max)
    head = (f"warning: {name + ': ' if name else ''}{given.describe()} disagrees with "
            f"the tomogram's spectrum ({est[0]:.0f}..{est[1]:.0f} degrees about "
            f"{estimate.axis.upper()}): ")
    if estimate.swapped:
        return head + ("its Y and Z axes look swapped (the missing wedge lies in the YX "
                       "plane), as in an IMOD reconstruction that was not rotated; rotate "
                       "it (e.g. trimvol -rx) before using it")
    model = given.source == "model"
    if estimate.axis != given.axis:
        return head + (f"the tilt axis looks like {estimate.axis.upper()}, not "
                       f"{given.axis.upper()}; " + ("the model was trained on another "
                                                    "geometry" if model else
                                                    f"set --tilt-axis {estimate.axis}"))
    ours = (given.tilt_min, given.tilt_max)
    if _close(ours, est, tolerance):
        return None
    if model:
        return head + ("the model was trained on another tilt range; the missing wedge "
                       "will be filled less well (give this tomogram's range with "
                       "--tilt-min/--tilt-max to check, or retrain)")
    if _close((math.degrees(ours[0]), math.degrees(ours[1])), est, tolerance):
        return head + ("the tilt angles look like radians (a tilt file in the wrong "
                       "units); give them in degrees")
    if _close((-ours[1], -ours[0]), est, tolerance):
        return head + ("the range looks mirrored (the opposite sign convention of the "
                       "tilt angles, or a flipped axis); negate the angles")
    off = max(abs(ours[0] - est[0]), abs(ours[1] - est[1]))
    return head + (f"an end differs by {off:.0f} degrees (the tilt file of another "
                   "tomogram, or tilts left out of the reconstruction?); check "
                   "--tilt-min/--tilt-max or --tilt-file")


def find_tilt_file(tomogram: str | os.PathLike) -> Path | None:
    """A tilt file next to `tomogram`: ``<stem>.tlt``, ``<stem>.rawtlt`` or
    ``tilts.tlt`` in its folder, else None."""
    p = Path(tomogram)
    for cand in (*(p.with_suffix(s) for s in TILT_FILE_SUFFIXES), p.parent / "tilts.tlt"):
        if cand.is_file():
            return cand
    return None


__all__ = ["DEFAULT_TILT_RANGE", "GEOMETRY_TOLERANCE_DEG", "TILT_AXES", "TiltGeometry",
           "estimate_mismatch", "find_tilt_file", "geometry_mismatch"]
