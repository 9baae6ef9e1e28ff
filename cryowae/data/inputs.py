"""The tomograms a command is given: paths, globs, list files, Portal folders; their
output names.

An input *spec* is one of

* a path of an MRC file or a Zarr store;
* a glob (quoted, so the shell leaves it alone; ``**`` spans folders), e.g.
  ``'TS_*/tomo.mrc'`` or ``'data/**/*.mrc'``: its matches, sorted;
* a list file, ``@list.txt`` or any ``.txt`` file: one spec per line (a path, glob or
  folder; relative ones are read from the list file's folder), blank lines and lines
  starting with ``#`` skipped;
* a folder (not a Zarr store) in the CryoET Data Portal layout, a dataset or a run:
  every tomogram in it (`cryowae.io.portal.find_portal_tomograms`).

A spec that names nothing (missing file, pattern without match, empty list, folder
without Portal tomograms) is a `CryowaeInputError`. An input given twice is kept once.

Output names (`output_names`): an input's file name without its suffix (``.mrc``,
``.zarr``, ``.ome.zarr``...) when these are unique over the inputs, as before; when two
inputs share a file name (one folder per tilt series, the same file name in each, as
the Portal, EMPIAR depositions and most pipelines lay data out), every input is named
by its path relative to the inputs' common folder instead (``TS_01/tomo``,
``TS_02/tomo``), unique by construction. A name depends on the whole input set: run a
batch again with the same inputs to resume it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryowae.errors import CryowaeInputError
from cryowae.io import is_zarr_path, read_volume
from cryowae.io.portal import find_portal_tomograms, portal_tomogram, voxel_size_note

#: suffixes an output name drops (longest first)
SUFFIXES = (".ome.zarr", ".zarr", ".mrc", ".rec", ".map", ".st", ".mrcs", ".ali")
_GLOB = set("*?[")


@dataclass(frozen=True)
class InputSet:
    """Expanded inputs, in the order given (a glob's or folder's matches sorted), and
    one-line notes for the user (Portal voxel sizes that disagree with their folder)."""

    paths: list[Path]
    notes: list[str] = field(default_factory=list)


def input_stem(path: str | os.PathLike) -> str:
    """An input's file name without ``.mrc``/``.rec``/``.zarr``/``.ome.zarr``...
    (``TS_01.ome.zarr`` -> ``TS_01``)."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem or name


def output_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output names of `paths` (see the module docstring): file stems when unique, else
    ``/``-separated paths relative to the common folder, without suffix."""
    stems = [input_stem(p) for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    absolute = [Path(os.path.abspath(p)) for p in paths]
    common = Path(os.path.commonpath([str(a.parent) for a in absolute]))
    return [(a.parent.relative_to(common) / input_stem(a)).as_posix() for a in absolute]


def _from_folder(path: Path, label: str) -> list[Path]:
    found = find_portal_tomograms(path)
    if not found:
        raise CryowaeInputError(
            f"{label}: a folder that is neither a Zarr store nor a CryoET Data Portal "
            "dataset or run (no */Reconstructions/VoxelSpacing*/Tomograms/*/*.zarr or "
            "*/Tomograms/VoxelSpacing*/CanonicalTomogram/*.zarr in it)")
    return found


def _from_path(path: Path, label: str) -> list[Path]:
    if not path.exists():
        raise CryowaeInputError(f"{label}: no such file or directory")
    if path.is_dir() and not is_zarr_path(path):
        return _from_folder(path, label)
    return [path]


def _from_list(path: Path, label: str) -> list[Path]:
    if not path.is_file():
        raise CryowaeInputError(f"{label}: no such list file")
    out: list[Path] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number}"
        if line.startswith("@") or line.lower().endswith(".txt"):
            raise CryowaeInputError(f"{where}: a list file may not name another list")
        out += _from_spec(line, where, base=path.parent)
    if not out:
        raise CryowaeInputError(f"{label}: the list names no inputs")
    return out


def _from_spec(spec: str, label: str, base: Path | None = None) -> list[Path]:
    text = spec.strip()
    if text.startswith("@"):
        target = Path(text[1:])
        return _from_list(target if base is None else base / target, label)
    path = Path(text) if base is None else base / text
    if path.suffix.lower() == ".txt" and path.is_file():
        return _from_list(path, label)
    if _GLOB & set(text) and not path.exists():
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise CryowaeInputError(f"{label}: the pattern matches no file")
        return [p for m in matches for p in _from_path(Path(m), m)]
    return _from_path(path, label)


def _note(path: Path) -> str | None:
    """A line when a Portal tomogram's voxel sizes disagree (None otherwise)."""
    if portal_tomogram(path) is None:
        return None
    with read_volume(path) as vol:
        if vol.meta.get("voxel_source") == "folder":
            return (f"note: {path}: no voxel size in its NGFF metadata; using "
                    f"{vol.voxel_size:g} A from its VoxelSpacing folder")
        return voxel_size_note(path, vol.voxel_size)


def expand_inputs(specs: Sequence[str | os.PathLike], what: str = "input") -> InputSet:
    """Expand input specs (module docstring) into existing paths, in order, each once.

    `what` names the inputs in the error for an empty result (``"tomogram"``...).
    Raises `CryowaeInputError` for a spec that names nothing.
    """
    seen: set[str] = set()
    paths: list[Path] = []
    for spec in specs:
        for p in _from_spec(str(spec), str(spec)):
            key = os.path.abspath(p)
            if key not in seen:
                seen.add(key)
                paths.append(p)
    if not paths:
        raise CryowaeInputError(f"no {what}s given")
    notes = [n for p in paths if (n := _note(p)) is not None]
    return InputSet(paths, notes)


__all__ = ["SUFFIXES", "InputSet", "expand_inputs", "input_stem", "output_names"]
