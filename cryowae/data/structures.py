"""Real protein structures for simulations, from the `mdanalysistests` source package.

The MDAnalysis test-data package on PyPI ships dozens of atomic models under
``MDAnalysisTests/data/``. `fetch_example_structures` downloads its source archive once
(`cryowae.data.fetch.download`: pinned address, size and SHA-256, written atomically)
into a cache folder and extracts five proteins of different sizes as plain PDB files,
for ``cryowae simulate --pdb``. Diameters are twice the largest atom distance from the
centroid, without waters:

================  ====================================  ========  =====  ========
file              protein                               residues  atoms  diameter
================  ====================================  ========  =====  ========
1hvr.pdb          HIV-1 protease dimer with inhibitor   198       1890   6.3 nm
adk_open.pdb      adenylate kinase, open (no element    214       3341   7.4 nm
                  column: elements guessed from names)
19hc.pdb          two-chain heme protein complex        584       5136   9.3 nm
6msm.pdb          CFTR (3 chains) with ATP and Mg       1198      9703   14.7 nm
3kpr.pdb          10-chain complex                      1652      13318  19.8 nm
================  ====================================  ========  =====  ========
"""

from __future__ import annotations

import bz2
import gzip
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from cryowae.data.fetch import TIMEOUT, download
from cryowae.data.verify import sha256_file
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.progress import ProgressReporter


@dataclass(frozen=True)
class Archive:
    """A pinned download: address, file name, size in bytes and SHA-256 (hex)."""

    url: str
    file_name: str
    size_bytes: int
    sha256: str


#: the source archive of mdanalysistests 2.11.0 on PyPI
MDANALYSISTESTS = Archive(
    url="https://files.pythonhosted.org/packages/27/bb/"
        "f16a0690f7f0219eec3310deb3d47f09da6df58a50873f6624f4742ea6f0/"
        "mdanalysistests-2.11.0.tar.gz",
    file_name="mdanalysistests-2.11.0.tar.gz",
    size_bytes=59555441,
    sha256="5edeb5b01805da728b202103aa8d2b5974a37f1005ab1fe0150ed7d59702d2ea",
)
#: per output file, its member under MDAnalysisTests/data/
EXAMPLE_STRUCTURES = {
    "1hvr.pdb": "1hvr.pdb",
    "adk_open.pdb": "adk_open.pdb",
    "19hc.pdb": "19hc.pdb.gz",
    "6msm.pdb": "6msm.pdb.bz2",
    "3kpr.pdb": "mmcif/3KPR.pdb.gz",
}


def default_cache_dir() -> Path:
    """$CRYOWAE_CACHE_DIR, else $XDG_CACHE_HOME/cryowae, else ~/.cache/cryowae (as the
    napari sample data)."""
    if os.environ.get("CRYOWAE_CACHE_DIR"):
        return Path(os.environ["CRYOWAE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cryowae"


def cached_archive(cache: Path, archive: Archive = MDANALYSISTESTS,
                   progress: ProgressReporter | None = None, timeout: float = TIMEOUT
                   ) -> Path:
    """The archive in `cache`: a copy there with the pinned size and SHA-256, else
    downloaded (and checked) first."""
    path = cache / archive.file_name
    if (path.is_file() and path.stat().st_size == archive.size_bytes
            and sha256_file(path) == archive.sha256):
        return path
    cache.mkdir(parents=True, exist_ok=True)
    download(archive.url, path, archive.size_bytes, archive.sha256, timeout=timeout,
             progress=progress, label=archive.file_name)
    return path


def _read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of each wanted member (a path under MDAnalysisTests/data/), in one pass
    over the .tar.gz archive."""
    want = {"MDAnalysisTests/data/" + m: m for m in members}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                m = next((m for suffix, m in want.items()
                          if info.name.endswith(suffix) and m not in found), None)
                fh = tf.extractfile(info) if m is not None else None
                if m is not None and fh is not None:
                    found[m] = fh.read()
                if len(found) == len(want):
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise CryowaeInputError(f"{archive}: not a readable .tar.gz archive ({exc}); "
                                "delete it to download it again") from None
    missing = [m for m in members if m not in found]
    if missing:
        raise CryowaeInputError(f"{archive.name} holds no MDAnalysisTests/data/{missing[0]}")
    return found


def fetch_example_structures(dest_dir: str | os.PathLike,
                             cache_dir: str | os.PathLike | None = None,
                             archive: Archive = MDANALYSISTESTS,
                             progress: ProgressReporter | None = None,
                             timeout: float = TIMEOUT) -> list[Path]:
    """Example protein models as plain PDB files in `dest_dir` (see the module table).

    Downloads `archive` into `cache_dir` (default `default_cache_dir()`) unless it is
    there already; files already in `dest_dir` are kept. Raises `CryowaeInputError`
    when the archive cannot be downloaded or does not match its pinned size and
    SHA-256. Returns the paths, smallest protein first.
    """
    dest = Path(dest_dir)
    out = [dest / name for name in EXAMPLE_STRUCTURES]
    if all(p.is_file() for p in out):
        return out
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cached_archive(cache, archive, progress, timeout)
    dest.mkdir(parents=True, exist_ok=True)
    todo = [(p, m) for p, m in zip(out, EXAMPLE_STRUCTURES.values(), strict=True)
            if not p.is_file()]
    blobs = _read_members(path, [m for _, m in todo])
    for target, member in todo:
        data = blobs[member]
        if member.endswith(".gz"):
            data = gzip.decompress(data)
        elif member.endswith(".bz2"):
            data = bz2.decompress(data)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
    return out
