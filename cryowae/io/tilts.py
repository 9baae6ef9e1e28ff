"""Tilt-angle files (.tlt / .rawtlt: one angle in degrees per line)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryowae.errors import CryowaeInputError


def read_tilt_angles(path: str | os.PathLike) -> np.ndarray:
    """Read tilt angles in degrees, one per line (blank lines and # comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise CryowaeInputError(f"{p}: no such tilt-angle file")
    angles = []
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), start=1):
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        try:
            angles.append(float(s.split()[0]))
        except ValueError:
            raise CryowaeInputError(f"{p}:{n}: not a tilt angle: {s[:40]!r}") from None
    if len(angles) < 2:
        raise CryowaeInputError(f"{p}: needs at least two tilt angles, found {len(angles)}")
    arr = np.asarray(angles, dtype=np.float64)
    if np.any(np.abs(arr) >= 90):
        raise CryowaeInputError(f"{p}: tilt angles must lie strictly between -90 and 90 degrees")
    return arr


def write_tilt_angles(path: str | os.PathLike, angles: np.ndarray) -> None:
    Path(path).write_text("".join(f"{a:.2f}\n" for a in np.asarray(angles, dtype=float)))
