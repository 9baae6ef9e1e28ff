"""Manifests of public tomograms: load, validate, and check local copies.

A manifest is a YAML file (schema in ``data_manifests/README.md``)::

    schema_version: 1
    entries:
      - name: pombe-def-ts026
        source: {type: cryoet-data-portal, dataset_id: 10000, run_name: TS_026}
        voxel_size_A: 13.48
        tilt_min: -40
        tilt_max: 58
        file_name: TS_026.mrc
        size_bytes: 1781761024
        sha256: null
        url: https://...
        license: CC0-1.0
        citation: ...

`load_manifest` turns schema violations into a `CryowaeInputError` that names the file,
the entry and the field. `verify` checks the files of a directory against it: presence,
size, and SHA-256 (streamed in chunks; "unchecked" where the manifest gives none); it
lives in `cryowae.data.verify`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryowae.errors import CryowaeInputError

SCHEMA_VERSION = 1
SOURCE_TYPES = ("cryoet-data-portal", "empiar")
EMPIAR_FTP = "https://ftp.ebi.ac.uk/empiar/world_availability"
URL_SCHEMES = ("https://", "http://", "file://")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ENTRY_FIELDS = {
    "name", "description", "source", "voxel_size_A", "tilt_min", "tilt_max", "tilt_axis",
    "shape", "file_name", "size_bytes", "sha256", "url", "license", "citation",
}
_REQUIRED = ("name", "source", "voxel_size_A", "tilt_min", "tilt_max", "file_name",
             "license", "citation")
_SOURCE_FIELDS = {
    "cryoet-data-portal": {"type", "dataset_id", "run_id", "run_name", "tomogram_id"},
    "empiar": {"type", "empiar_id", "path"},
}


@dataclass(frozen=True)
class ManifestEntry:
    """One downloadable tomogram. Field meanings: ``data_manifests/README.md``."""

    name: str
    source: dict[str, Any]
    voxel_size_A: float
    tilt_min: float
    tilt_max: float
    file_name: str
    license: str
    citation: str
    tilt_axis: str = "y"
    shape: tuple[int, int, int] | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    url: str | None = None
    description: str = ""

    @property
    def source_type(self) -> str:
        return str(self.source["type"])

    def download_url(self) -> str | None:
        """The manifest's `url`, or for EMPIAR entries the archive's https path."""
        if self.url:
            return self.url
        if self.source_type == "empiar":
            return f"{EMPIAR_FTP}/{self.source['empiar_id']}/{self.source['path'].lstrip('/')}"
        return None


@dataclass
class Manifest:
    """A validated manifest: its path (for messages) and its entries, in file order."""

    path: Path
    entries: list[ManifestEntry] = field(default_factory=list)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def local_path(self, entry: ManifestEntry, directory: str | os.PathLike) -> Path:
        """Where `entry`'s file belongs under `directory`: ``directory/file_name``, or,
        when other entries share its file name, its place in the Portal's folder layout
        (`cryowae.io.portal.portal_relpath`)."""
        if sum(e.file_name == entry.file_name for e in self.entries) == 1:
            return Path(directory) / entry.file_name
        from cryowae.io.portal import portal_relpath

        s = entry.source
        return Path(directory) / portal_relpath(s["dataset_id"], s["run_name"],
                                                entry.voxel_size_A, s["tomogram_id"],
                                                entry.file_name)

    def select(self, names: Sequence[str] | None) -> list[ManifestEntry]:
        """The entries called `names` (all entries when empty or None)."""
        if not names:
            return list(self.entries)
        by_name = {e.name: e for e in self.entries}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise CryowaeInputError(
                f"{self.path}: no entry named {', '.join(map(repr, unknown))} (entries: "
                f"{', '.join(self.names())})")
        return [by_name[n] for n in names]


# ----------------------------------------------------------------------------- loading


class _EntryError(CryowaeInputError):
    pass


def _where(path: Path, index: int, name: Any) -> str:
    label = f"entry {name!r}" if isinstance(name, str) and name else f"entry #{index + 1}"
    return f"{path}: {label}"


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_source(src: Any, bad: Callable[[str, str], None]) -> dict[str, Any]:
    if not isinstance(src, Mapping):
        bad("source", "must be a mapping with a 'type'")
    src = dict(src)
    kind = src.get("type")
    if kind not in SOURCE_TYPES:
        bad("source.type", f"must be one of {', '.join(SOURCE_TYPES)}, got {kind!r}")
    unknown = sorted(set(src) - _SOURCE_FIELDS[kind])
    if unknown:
        bad(f"source.{unknown[0]}", f"is not a field of a {kind} source (fields: "
            f"{', '.join(sorted(_SOURCE_FIELDS[kind]))})")
    if kind == "cryoet-data-portal":
        if not (_is_int(src.get("dataset_id")) and src["dataset_id"] > 0):
            bad("source.dataset_id", f"must be a positive integer, got {src.get('dataset_id')!r}")
        for key in ("run_id", "tomogram_id"):
            v = src.get(key)
            if v is not None and not (_is_int(v) and v > 0):
                bad(f"source.{key}", f"must be a positive integer or null, got {v!r}")
        rn = src.get("run_name")
        if rn is not None and not (isinstance(rn, str) and rn.strip()):
            bad("source.run_name", f"must be a non-empty string or null, got {rn!r}")
        if src.get("run_id") is None and rn is None and src.get("tomogram_id") is None:
            bad("source", "a cryoet-data-portal source needs run_name, run_id or tomogram_id")
    else:
        eid = src.get("empiar_id")
        if isinstance(eid, str) and re.fullmatch(r"(EMPIAR-)?\d+", eid.strip(), re.I):
            src["empiar_id"] = int(eid.strip().upper().removeprefix("EMPIAR-"))
        elif not (_is_int(eid) and eid > 0):
            bad("source.empiar_id", f"must be an EMPIAR number such as 10988, got {eid!r}")
        p = src.get("path")
        if not (isinstance(p, str) and p.strip()) or ".." in Path(p).parts:
            bad("source.path", f"must be the file's path inside the entry, got {p!r}")
    return src


def _parse_entry(raw: Any, index: int, path: Path) -> ManifestEntry:
    if not isinstance(raw, Mapping):
        raise CryowaeInputError(f"{path}: entry #{index + 1} must be a mapping, got "
                                f"{type(raw).__name__}")
    where = _where(path, index, raw.get("name"))

    def bad(fld: str, why: str) -> None:
        raise _EntryError(f"{where}: field '{fld}' {why}")

    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        bad(unknown[0], f"is not a manifest field (fields: {', '.join(sorted(_ENTRY_FIELDS))})")
    for key in _REQUIRED:
        if raw.get(key) is None:
            bad(key, "is missing")
    name = raw["name"]
    if not (isinstance(name, str) and _NAME_RE.match(name)):
        bad("name", f"must be letters, digits, '.', '_' or '-', got {name!r}")
    source = _check_source(raw["source"], bad)
    vs = raw["voxel_size_A"]
    if not (_is_number(vs) and vs > 0):
        bad("voxel_size_A", f"must be a positive number of Angstrom, got {vs!r}")
    tmin, tmax = raw["tilt_min"], raw["tilt_max"]
    for key, v in (("tilt_min", tmin), ("tilt_max", tmax)):
        if not _is_number(v):
            bad(key, f"must be a number of degrees, got {v!r}")
    if not (-90.0 < tmin < tmax < 90.0):
        bad("tilt_min", f"and tilt_max give an impossible range {tmin}..{tmax} degrees "
            "(need -90 < tilt_min < tilt_max < 90)")
    axis = raw.get("tilt_axis", "y") or "y"
    if axis not in ("y", "x"):
        bad("tilt_axis", f"must be 'y' or 'x', got {axis!r}")
    shape = raw.get("shape")
    if shape is not None:
        if not (isinstance(shape, Sequence) and not isinstance(shape, str) and len(shape) == 3
                and all(_is_int(s) and s > 0 for s in shape)):
            bad("shape", f"must be three positive integers (Z, Y, X) or null, got {shape!r}")
        shape = tuple(int(s) for s in shape)
    fname = raw["file_name"]
    if not (isinstance(fname, str) and fname.strip() and fname not in (".", "..")
            and "/" not in fname and "\\" not in fname):
        bad("file_name", f"must be a plain file name (no folders), got {fname!r}")
    size = raw.get("size_bytes")
    if size is not None and not (_is_int(size) and size > 0):
        bad("size_bytes", f"must be a positive integer or null, got {size!r}")
    sha = raw.get("sha256")
    if sha is not None:
        if not (isinstance(sha, str) and _SHA_RE.match(sha.strip().lower())):
            bad("sha256", "must be 64 hexadecimal digits or null")
        sha = sha.strip().lower()
    url = raw.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(URL_SCHEMES)):
        bad("url", f"must start with {', '.join(URL_SCHEMES)} or be null, got {url!r}")
    for key in ("license", "citation"):
        if not (isinstance(raw[key], str) and raw[key].strip()):
            bad(key, "must be a non-empty string")
    desc = raw.get("description") or ""
    if not isinstance(desc, str):
        bad("description", "must be a string")
    return ManifestEntry(
        name=name, source=source, voxel_size_A=float(vs), tilt_min=float(tmin),
        tilt_max=float(tmax), tilt_axis=axis, shape=shape, file_name=fname,
        size_bytes=size, sha256=sha, url=url, license=raw["license"].strip(),
        citation=" ".join(raw["citation"].split()), description=" ".join(desc.split()),
    )


def parse_manifest(data: Any, path: str | os.PathLike = "<manifest>") -> Manifest:
    """Validate an already-parsed manifest (the mapping a YAML file holds)."""
    p = Path(path)
    if not isinstance(data, Mapping):
        raise CryowaeInputError(f"{p}: a manifest is a mapping with 'schema_version' and "
                                "'entries'")
    unknown = sorted(set(data) - {"schema_version", "entries"})
    if unknown:
        raise CryowaeInputError(f"{p}: unknown top-level field {unknown[0]!r} (fields: "
                                "schema_version, entries)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise CryowaeInputError(f"{p}: schema_version {version!r} is not supported "
                                f"(this cryowae reads version {SCHEMA_VERSION})")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise CryowaeInputError(f"{p}: 'entries' must be a non-empty list")
    entries = [_parse_entry(raw, i, p) for i, raw in enumerate(raw_entries)]
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.name in seen:
            raise CryowaeInputError(f"{p}: entry #{i + 1}: field 'name' repeats {e.name!r} "
                                    f"(already used by entry #{seen[e.name] + 1})")
        seen[e.name] = i
    first: dict[str, ManifestEntry] = {}
    places: set[tuple[Any, ...]] = set()
    for e in entries:
        other = first.setdefault(e.file_name, e)
        if other is e:
            continue
        # one file name in several entries: only Portal entries that say where in the
        # Portal's folder layout each copy lives (the layout the Portal ships them in)
        for x in (other, e):
            if _portal_place(x) is None:
                raise CryowaeInputError(
                    f"{p}: entry {e.name!r}: field 'file_name' {e.file_name!r} is also used "
                    f"by entry {other.name!r} (entries may share a file name only as "
                    "cryoet-data-portal entries with run_name and tomogram_id)")
        places.add(_portal_place(other))
        if _portal_place(e) in places:
            raise CryowaeInputError(f"{p}: entry {e.name!r}: the same Portal tomogram as "
                                    f"another entry with file_name {e.file_name!r}")
        places.add(_portal_place(e))
    return Manifest(path=p, entries=entries)


def _portal_place(e: ManifestEntry) -> tuple[Any, ...] | None:
    """(dataset_id, run_name, tomogram_id) of a Portal entry that gives all three."""
    s = e.source
    if e.source_type != "cryoet-data-portal" or s.get("run_name") is None \
            or s.get("tomogram_id") is None:
        return None
    return s["dataset_id"], s["run_name"], s["tomogram_id"]


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and validate a manifest YAML file; raise `CryowaeInputError` if invalid."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CryowaeInputError(f"{p}: no such manifest file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise CryowaeInputError(f"{p}: not valid YAML{at}: {first}") from None
    return parse_manifest(data, p)
