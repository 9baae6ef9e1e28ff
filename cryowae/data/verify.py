"""Checking local copies of a manifest's files: presence, size and SHA-256.

`verify` checks every entry of a manifest against a folder: the file at the entry's
`Manifest.local_path` (``folder/file_name``, or its place in the CryoET Data Portal's
folder layout when entries share a file name), a Portal entry's file also found in the
Portal layout below the folder.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryowae.data.manifest import Manifest, ManifestEntry, load_manifest
from cryowae.errors import CryowaeInputError

#: bytes read at a time when hashing
CHUNK = 8 * 1024 * 1024

#: statuses of `VerifyResult.status`
OK, MISSING, SIZE_MISMATCH, HASH_MISMATCH = "ok", "missing", "size mismatch", "hash mismatch"


@dataclass
class VerifyResult:
    """Outcome of checking one entry's file.

    ``status`` is "ok", "missing", "size mismatch" or "hash mismatch"; ``size_check``
    and ``hash_check`` are "ok", "mismatch", "unchecked" (the manifest gives no value)
    or "skipped" (not reached); ``detail`` is a short human-readable note.
    """

    name: str
    path: Path
    status: str
    size_check: str = "skipped"
    hash_check: str = "skipped"
    size_bytes: int | None = None
    sha256: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK,
                on_chunk: Callable[[int], None] | None = None) -> str:
    """SHA-256 hex digest of a file, read `chunk` bytes at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_chunk is not None:
                on_chunk(len(block))
    return h.hexdigest()


def _find_copy(entry: ManifestEntry, directory: Path, path: Path) -> tuple[Path, str]:
    """`path` when it is a file; else, for a Portal entry, its one copy in the Portal's
    folder layout under `directory`; with a note when none or several are found."""
    if path.is_file() or entry.source_type != "cryoet-data-portal" or not directory.is_dir():
        return path, "not found"
    from cryowae.io.portal import find_portal_file

    s = entry.source
    copies = find_portal_file(directory, entry.file_name, run=s.get("run_name"),
                              dataset_id=s.get("dataset_id"),
                              tomogram_id=s.get("tomogram_id"),
                              voxel_spacing=entry.voxel_size_A)
    if len(copies) == 1:
        return copies[0], ""
    if copies:
        return path, (f"{len(copies)} copies in the Portal layout ({copies[0]}, ...); give "
                      "the entry's run_name and tomogram_id")
    return path, "not found (nor in the Portal layout)"


def verify_entry(entry: ManifestEntry, directory: str | os.PathLike,
                 on_chunk: Callable[[int], None] | None = None,
                 path: str | os.PathLike | None = None) -> VerifyResult:
    """Check one entry's file in `directory` (at `path`, default ``directory/file_name``;
    a Portal entry's file is also looked for in the Portal's folder layout): presence,
    size, then SHA-256."""
    path, why = _find_copy(entry, Path(directory),
                           Path(path) if path is not None else Path(directory) / entry.file_name)
    if not path.is_file():
        return VerifyResult(entry.name, path, MISSING, detail=why)
    size = path.stat().st_size
    res = VerifyResult(entry.name, path, OK, size_bytes=size)
    if entry.size_bytes is None:
        res.size_check = "unchecked"
    elif size != entry.size_bytes:
        res.status, res.size_check = SIZE_MISMATCH, "mismatch"
        res.detail = f"{size} bytes, manifest says {entry.size_bytes}"
        return res
    else:
        res.size_check = "ok"
    if entry.sha256 is None:
        res.hash_check = "unchecked"
        res.detail = "no sha256 in the manifest"
        return res
    res.sha256 = sha256_file(path, on_chunk=on_chunk)
    if res.sha256 != entry.sha256:
        res.status, res.hash_check = HASH_MISMATCH, "mismatch"
        res.detail = f"sha256 {res.sha256[:12]}..., manifest says {entry.sha256[:12]}..."
    else:
        res.hash_check = "ok"
    return res


def verify(manifest: Manifest | str | os.PathLike, directory: str | os.PathLike,
           names: Sequence[str] | None = None,
           on_chunk: Callable[[int], None] | None = None) -> list[VerifyResult]:
    """Check every entry (or those in `names`) of `manifest` against `directory`.

    Returns one `VerifyResult` per entry, in manifest order. `on_chunk(n_bytes)` is
    called while hashing, for progress display.
    """
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CryowaeInputError(f"{d}: not a directory")
    return [verify_entry(e, d, on_chunk, m.local_path(e, d)) for e in m.select(names)]
