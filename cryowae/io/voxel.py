"""The voxel size of an input tomogram: the one its file stores, the one the user gives
(``--voxel-size``), or an assumed 1 A, said in one line.

A file stores no voxel size when its format has none (a TIFF without OME, ImageJ or
resolution metadata; an OME-Zarr store without a scale or Portal folder) or its header
holds 0 or 1 (the values writers leave when they set none; an MRC header with 0 is
refused unless a voxel size is given, as it always was). `resolve_voxel_size` is the one
rule: a given voxel size is used as is (with a line when it replaces a different stored
one), a stored one is kept, otherwise 1 A is assumed with a line saying so.

Commands give the voxel size for every input they read through `given_voxel_size` (a
context in which `cryowae.io.read_volume` uses it), so library functions that open the
tomogram themselves (`restore_file`, `sample_file`, `load_sources`) need no parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from pathlib import Path

from cryowae.errors import CryowaeInputError

#: header values that mean "no voxel size stored"
UNSET_VOXEL_SIZES = (0.0, 1.0)
#: the voxel size assumed when none is stored or given, Angstrom
ASSUMED_VOXEL_SIZE = 1.0
#: relative difference below which a given and a stored voxel size agree
TOLERANCE = 1e-3

_GIVEN: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "cryowae_given_voxel_size", default=None)


def check_voxel_size(value: float, what: str = "--voxel-size") -> float:
    """`value` as a float; `CryowaeInputError` unless it is finite and positive."""
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise CryowaeInputError(f"{what} must be a positive number of Angstrom, got {v:g}")
    return v


@contextlib.contextmanager
def given_voxel_size(value: float | None) -> Iterator[float | None]:
    """Within the block, `cryowae.io.read_volume` gives every volume it reads the voxel
    size `value` (Angstrom; None: the files' own). Validated on entry."""
    token = _GIVEN.set(None if value is None else check_voxel_size(value))
    try:
        yield _GIVEN.get()
    finally:
        _GIVEN.reset(token)


def current_given_voxel_size() -> float | None:
    """The voxel size of the enclosing `given_voxel_size` block, or None."""
    return _GIVEN.get()


def stores_voxel_size(stored: float | None) -> bool:
    """Whether a stored value is a voxel size (not None, 0, 1 or invalid)."""
    return (stored is not None and math.isfinite(stored) and stored > 0
            and all(abs(stored - u) > TOLERANCE * max(u, 1.0) for u in UNSET_VOXEL_SIZES))


def resolve_voxel_size(stored: float | None, given: float | None,
                       name: str) -> tuple[float, str | None]:
    """The voxel size (Angstrom) to use for the file `name` and the line to say about
    it (None when there is nothing to say): `given` when given, else `stored` when the
    file stores one, else `ASSUMED_VOXEL_SIZE` (module docstring)."""
    name = Path(name).name
    if given is not None:
        given = check_voxel_size(given)
        if stores_voxel_size(stored) and abs(stored - given) > TOLERANCE * given:  # type: ignore[operator]
            return given, (f"voxel size: {name} stores {stored:g} A; using "
                           f"--voxel-size {given:g} A")
        return given, None
    if stores_voxel_size(stored):
        return float(stored), None  # type: ignore[arg-type]
    what = ("none stored in" if stored is None or not stored > 0
            else f"{stored:g} A (the value of files that set none) in")
    return ASSUMED_VOXEL_SIZE, (f"voxel size: {what} {name}; assuming "
                                f"{ASSUMED_VOXEL_SIZE:.1f} A (pass --voxel-size)")


__all__ = ["ASSUMED_VOXEL_SIZE", "UNSET_VOXEL_SIZES", "check_voxel_size",
           "current_given_voxel_size", "given_voxel_size", "resolve_voxel_size",
           "stores_voxel_size"]
