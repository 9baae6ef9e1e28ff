"""Local copies of the CryoET Data Portal's folder layout: finding tomograms, voxel sizes.

Schema followed (the Portal's published folder layout, from its data documentation
and its open-source ingestion code, read offline; the paths carry no schema version
number, so the two layouts are told apart by their folder names):

* current layout: ``{dataset}/{run}/Reconstructions/VoxelSpacing{vs:.3f}/Tomograms/
  {tomogram_id}/{run}.zarr`` (and ``{run}.mrc``), with ``tomogram_metadata.json`` (key
  ``voxel_spacing``, Angstrom) in the ``{tomogram_id}`` folder;
* older layout (a run downloaded before the Reconstructions folder):
  ``{run}/Tomograms/VoxelSpacing{vs}/CanonicalTomogram/{run}.zarr`` (and ``.mrc``), with
  ``tomogram_metadata.json`` beside them.

The Portal's stores are NGFF 0.4 multiscales written by `ome-zarr` (zarr format 2,
``/``-separated chunk keys), axes z, y, x with unit ``angstrom`` and one ``scale``
transformation per level (level 0: the voxel spacing rounded to 3 decimals; each further
level halves every axis); `cryowae.io.omezarr.read_ome_zarr` reads them as they are.
The voxel size is taken from the NGFF scale; the folder name is the fallback for a
store without one, and a disagreement (beyond the 3-decimal rounding) is reported in
one line (`voxel_size_note`).

Not verified offline: the layout against a real download (no network here; the tests
build the folders and stores from the description above), and Portal stores in zarr
format 3 / NGFF 0.5, should the Portal move to them (the reader reads NGFF 0.5).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: a voxel-spacing folder: ``VoxelSpacing13.480``
_SPACING = re.compile(r"^VoxelSpacing(\d+(?:\.\d*)?)$")
#: tomogram metadata file of a Portal tomogram folder
METADATA_FILE = "tomogram_metadata.json"
#: the Portal rounds voxel spacings to 3 decimals: differences below this are rounding
TOLERANCE_A = 1e-3


@dataclass(frozen=True)
class PortalTomogram:
    """Where a tomogram file sits in the Portal layout.

    Attributes
    ----------
    run
        The run's folder name (the tilt series' name chosen by the authors).
    voxel_spacing
        From the ``VoxelSpacing`` folder name, Angstrom.
    layout
        ``"reconstructions"`` (current) or ``"canonical"`` (older).
    tomogram_id
        The ``Tomograms/{id}`` folder name (current layout), else None.
    """

    run: str
    voxel_spacing: float
    layout: str
    tomogram_id: str | None


def _spacing(name: str) -> float | None:
    m = _SPACING.match(name)
    return float(m[1]) if m else None


def portal_tomogram(path: str | os.PathLike) -> PortalTomogram | None:
    """The Portal position of a tomogram file or store, or None when `path` is not in
    either layout (only the folder names are read)."""
    parents = Path(os.path.abspath(path)).parents
    names = [p.name for p in list(parents)[:5]]
    if (len(names) >= 5 and names[1] == "Tomograms" and names[3] == "Reconstructions"
            and (vs := _spacing(names[2])) is not None):
        return PortalTomogram(names[4], vs, "reconstructions", names[0])
    if (len(names) >= 4 and names[0] == "CanonicalTomogram" and names[2] == "Tomograms"
            and (vs := _spacing(names[1])) is not None):
        return PortalTomogram(names[3], vs, "canonical", None)
    return None


def folder_voxel_spacing(path: str | os.PathLike) -> float | None:
    """The voxel spacing (Angstrom) named by the Portal folders around `path`, or None."""
    pos = portal_tomogram(path)
    return pos.voxel_spacing if pos else None


def metadata_voxel_spacing(path: str | os.PathLike) -> float | None:
    """``voxel_spacing`` of the ``tomogram_metadata.json`` beside a Portal tomogram, or
    None (absent, unreadable or without the key)."""
    meta = Path(path).parent / METADATA_FILE
    try:
        value = json.loads(meta.read_text()).get("voxel_spacing")
        return float(value) if value is not None else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def voxel_size_note(path: str | os.PathLike, voxel_size: float) -> str | None:
    """One line when the voxel size read from a Portal tomogram (`voxel_size`, Angstrom,
    from its NGFF scale or MRC header) disagrees with its ``VoxelSpacing`` folder or its
    ``tomogram_metadata.json``; None when they agree or `path` is not a Portal tomogram."""
    pos = portal_tomogram(path)
    if pos is None:
        return None
    others = {"the folder name": pos.voxel_spacing,
              METADATA_FILE: metadata_voxel_spacing(path)}
    off = [f"{where} says {v:g} A" for where, v in others.items()
           if v is not None and abs(v - voxel_size) > TOLERANCE_A]
    if not off:
        return None
    return (f"warning: {path}: voxel size {voxel_size:g} A from its metadata, but "
            f"{' and '.join(off)}; using {voxel_size:g} A")


def _tomograms_in(folder: Path) -> list[Path]:
    """The tomogram files of one Portal tomogram folder: its .zarr stores, else its .mrc
    files (the Portal ships both formats of one tomogram; they are one input)."""
    zarrs = sorted(p for p in folder.iterdir() if p.suffix == ".zarr" and p.is_dir())
    if zarrs:
        return zarrs
    return sorted(p for p in folder.iterdir() if p.suffix == ".mrc" and p.is_file())


def find_portal_tomograms(root: str | os.PathLike) -> list[Path]:
    """Every tomogram under `root` (a dataset, a run or any folder below) in the Portal
    layout, sorted; Zarr stores are not descended into. Annotations, tilt series and
    other files are left out."""
    found: set[Path] = set()
    for dirpath, dirnames, _ in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not n.endswith(".zarr"))
        for cand in _tomograms_in(d):
            if portal_tomogram(cand) is not None:
                found.add(cand)
    return sorted(found)


__all__ = [
    "METADATA_FILE", "PortalTomogram", "find_portal_tomograms", "folder_voxel_spacing",
    "metadata_voxel_spacing", "portal_tomogram", "voxel_size_note",
]


def portal_relpath(dataset_id: int | str, run: str, voxel_spacing: float,
                   tomogram_id: int | str, file_name: str) -> Path:
    """Where the current Portal layout puts a tomogram file, relative to the download
    root: ``{dataset}/{run}/Reconstructions/VoxelSpacing{vs:.3f}/Tomograms/{id}/{file}``
    (`voxel_spacing` in Angstrom)."""
    return Path(str(dataset_id), run, "Reconstructions", f"VoxelSpacing{voxel_spacing:.3f}",
                "Tomograms", str(tomogram_id), file_name)


def find_portal_file(root: str | os.PathLike, file_name: str, *, run: str | None = None,
                     dataset_id: int | str | None = None,
                     tomogram_id: int | str | None = None,
                     voxel_spacing: float | None = None) -> list[Path]:
    """The copies of the file `file_name` under `root` that sit in either Portal layout
    and agree with those of `run`, `dataset_id`, `tomogram_id` and `voxel_spacing`
    (Angstrom, to the Portal's 3-decimal rounding) that are given; sorted. Zarr stores
    are not descended into."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(n for n in dirnames if not n.endswith(".zarr"))
        if file_name not in filenames:
            continue
        path = Path(dirpath) / file_name
        pos = portal_tomogram(path)
        if pos is None or (run is not None and pos.run != run):
            continue
        if (tomogram_id is not None and pos.tomogram_id is not None
                and pos.tomogram_id != str(tomogram_id)):
            continue
        if voxel_spacing is not None and abs(pos.voxel_spacing - voxel_spacing) > 5e-4:
            continue
        # the dataset folder sits above the run folder in the current layout
        dataset = path.parents[5].name if pos.layout == "reconstructions" else None
        if (dataset_id is not None and dataset is not None and dataset.isdigit()
                and dataset != str(dataset_id)):
            continue
        found.append(path)
    return sorted(found)
