"""Real protein structures for simulations, from the `mdanalysistests` source package.

The MDAnalysis test-data package on PyPI ships dozens of atomic models under
``MDAnalysisTests/data/``. `fetch_example_structures` downloads it once with pip (into a
cache folder) and extracts five proteins of different sizes as plain PDB files, for
``cryowae simulate --pdb``. Diameters are twice the largest atom distance from the
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
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from cryowae.errors import CryowaeInputError

#: the pinned source package and, per output file, its member under MDAnalysisTests/data/
PACKAGE = "mdanalysistests==2.11.0"
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


def _find_archive(cache: Path) -> Path | None:
    version = PACKAGE.split("==")[1]
    for pattern in (f"mdanalysistests-{version}.tar.gz", f"mdanalysistests-{version}*.whl",
                    f"MDAnalysisTests-{version}*.whl"):
        hits = sorted(cache.glob(pattern))
        if hits:
            return hits[0]
    return None


def _download(cache: Path, timeout: float) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", PACKAGE, "-d", str(cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CryowaeInputError(f"downloading {PACKAGE} took more than {timeout:g} s; "
                                "check the network or retry") from None
    archive = _find_archive(cache)
    if proc.returncode != 0 or archive is None:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise CryowaeInputError(f"could not download {PACKAGE} with pip ({why})")
    return archive


def _read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of each wanted member (a path under MDAnalysisTests/data/), in one pass
    over the archive."""
    want = {"MDAnalysisTests/data/" + m: m for m in members}
    found: dict[str, bytes] = {}

    def match(name: str) -> str | None:
        for suffix, m in want.items():
            if name.endswith(suffix) and m not in found:
                return m
        return None

    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                m = match(name)
                if m is not None:
                    found[m] = zf.read(name)
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf:
                m = match(info.name) if info.isfile() else None
                if m is not None:
                    fh = tf.extractfile(info)
                    if fh is not None:
                        found[m] = fh.read()
                if len(found) == len(want):
                    break
    missing = [m for m in members if m not in found]
    if missing:
        raise CryowaeInputError(f"{archive.name} holds no MDAnalysisTests/data/{missing[0]}")
    return found


def fetch_example_structures(dest_dir: str | os.PathLike, cache_dir: str | os.PathLike |
                             None = None, timeout: float = 300.0) -> list[Path]:
    """Example protein models as plain PDB files in `dest_dir` (see the module table).

    Downloads the `mdanalysistests` source package with pip into `cache_dir` (default
    `default_cache_dir()`) unless it is there already; files already in `dest_dir`
    are kept. Raises `CryowaeInputError` when the package cannot be downloaded.
    Returns the paths, smallest protein first.
    """
    dest = Path(dest_dir)
    out = [dest / name for name in EXAMPLE_STRUCTURES]
    if all(p.is_file() for p in out):
        return out
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = _find_archive(cache) or _download(cache, timeout)
    dest.mkdir(parents=True, exist_ok=True)
    todo = [(p, m) for p, m in zip(out, EXAMPLE_STRUCTURES.values(), strict=True)
            if not p.is_file()]
    blobs = _read_members(archive, [m for _, m in todo])
    for path, member in todo:
        data = blobs[member]
        if member.endswith(".gz"):
            data = gzip.decompress(data)
        elif member.endswith(".bz2"):
            data = bz2.decompress(data)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return out
