"""Download the tomograms of a manifest, verified and written atomically.

Entries from the CryoET Data Portal are looked up with the ``cryoet-data-portal`` client
(optional: ``pip install 'cryowae[portal]'``), which gives the current https address of
the MRC file (the portal's numeric ids may change, so entries are found by dataset id,
run name and voxel size unless a tomogram id is given). Without the client, the entry's
`url` is used if the manifest has one. EMPIAR entries and plain urls are streamed with
urllib. Every download goes to a temporary file next to the target, is checked against
the manifest's size and SHA-256, and only then renamed into place. A missing network is
detected with a short connection timeout and reported in one line.
"""

from __future__ import annotations

import hashlib
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryowae import __version__
from cryowae.data.manifest import Manifest, ManifestEntry, load_manifest
from cryowae.data.verify import CHUNK, verify_entry
from cryowae.errors import CryowaeInputError
from cryowae.io.atomic import atomic_path
from cryowae.progress import ProgressReporter, ensure_progress

#: seconds to wait for a connection (and for each read) before calling the network absent
TIMEOUT = 10.0
PORTAL_GRAPHQL_HOST = "graphql.cryoetdataportal.czscience.com"
MIB = 1024 * 1024


@dataclass
class FetchResult:
    """What `fetch` did for one entry: ``action`` is "downloaded" or "present"."""

    name: str
    path: Path
    action: str
    size_bytes: int
    sha256: str | None = None
    url: str | None = None


def check_network(url: str, timeout: float = TIMEOUT) -> None:
    """Raise `CryowaeInputError` quickly if the host of `url` cannot be reached."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        return
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise CryowaeInputError(
            f"no network: cannot reach {host}:{port} ({reason}); download the file by hand "
            "and check it with `cryowae data verify`") from None


def _portal_url(entry: ManifestEntry, timeout: float, progress: ProgressReporter) -> str:
    """The https address of an entry's MRC file, from the portal client or the manifest."""
    try:
        import cryoet_data_portal as portal
    except ImportError:
        if entry.url:
            check_network(entry.url, timeout)
            progress.log(f"{entry.name}: cryoet-data-portal is not installed (install "
                         "cryowae[portal]); using the manifest's url")
            return entry.url
        raise CryowaeInputError(
            f"entry {entry.name!r} comes from the CryoET Data Portal and has no url: install "
            "cryowae[portal] (pip install 'cryowae[portal]') to fetch it") from None
    check_network(f"https://{PORTAL_GRAPHQL_HOST}/graphql", timeout)
    src = entry.source
    try:
        client = portal.Client()
        if src.get("tomogram_id") is not None:
            tomos = [portal.Tomogram.get_by_id(client, int(src["tomogram_id"]))]
        else:
            T = portal.Tomogram
            filters = [T.run.dataset_id == int(src["dataset_id"])]
            if src.get("run_id") is not None:
                filters.append(T.run_id == int(src["run_id"]))
            if src.get("run_name") is not None:
                filters.append(T.run.name == str(src["run_name"]))
            tomos = list(T.find(client, filters))
            tomos = [t for t in tomos
                     if abs(float(t.voxel_spacing) - entry.voxel_size_A) < 1e-2]
    except Exception as exc:  # the client raises assorted transport/GraphQL errors
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CryowaeInputError(f"entry {entry.name!r}: the CryoET Data Portal query failed "
                                f"({first})") from None
    tomos = [t for t in tomos if t is not None and getattr(t, "https_mrc_file", None)]
    if not tomos:
        raise CryowaeInputError(f"entry {entry.name!r}: no tomogram on the CryoET Data Portal "
                                f"matches {src} at {entry.voxel_size_A:g} A")
    if entry.size_bytes is not None:  # prefer the one the manifest pinned
        sized = [t for t in tomos if int(getattr(t, "file_size_mrc", 0) or 0) == entry.size_bytes]
        tomos = sized or tomos
    return str(tomos[0].https_mrc_file)


def entry_url(entry: ManifestEntry, timeout: float = TIMEOUT,
              progress: ProgressReporter | None = None) -> str:
    """Where to download `entry` from (may query the CryoET Data Portal)."""
    progress = ensure_progress(progress)
    if entry.source_type == "cryoet-data-portal":
        return _portal_url(entry, timeout, progress)
    url = entry.download_url()
    if url is None:
        raise CryowaeInputError(f"entry {entry.name!r}: no url to download from")
    return url


def download(url: str, dest: str | os.PathLike, expected_size: int | None = None,
             expected_sha256: str | None = None, timeout: float = TIMEOUT,
             progress: ProgressReporter | None = None, label: str = "") -> tuple[int, str]:
    """Stream `url` into `dest` (temporary file, then rename); check size and SHA-256.

    Returns (bytes written, sha256 hex). Raises `CryowaeInputError` on a network or HTTP
    error, or when the file does not match `expected_size` / `expected_sha256`; `dest`
    is then left untouched.
    """
    progress = ensure_progress(progress)
    check_network(url, timeout)
    req = urllib.request.Request(url, headers={"User-Agent": f"cryowae/{__version__}"})
    name = label or Path(dest).name
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (scheme checked)
    except urllib.error.HTTPError as exc:
        raise CryowaeInputError(f"{name}: download failed, HTTP {exc.code} {exc.reason} "
                                f"for {url}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CryowaeInputError(f"{name}: download failed for {url} ({reason})") from None
    h = hashlib.sha256()
    n = 0
    with resp:
        length = resp.headers.get("Content-Length") if hasattr(resp, "headers") else None
        total = int(length) if length and length.isdigit() else expected_size
        if total is not None and expected_size is not None and total != expected_size:
            raise CryowaeInputError(
                f"{name}: the server offers {total} bytes but the manifest says "
                f"{expected_size}; the file at {url} has changed or the manifest is wrong")
        progress.start(max(1, -(-(total or 0) // MIB)), f"{name} (MiB)")
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                done_mib = 0
                while block := resp.read(CHUNK):
                    f.write(block)
                    h.update(block)
                    n += len(block)
                    now_mib = n // MIB
                    if now_mib > done_mib:
                        progress.advance(now_mib - done_mib)
                        done_mib = now_mib
                    progress.check_cancelled(f"{name}: download")
                f.flush()
                os.fsync(f.fileno())
                digest = h.hexdigest()
                if expected_size is not None and n != expected_size:
                    raise CryowaeInputError(f"{name}: downloaded {n} bytes, the manifest says "
                                            f"{expected_size}; nothing was written")
                if expected_sha256 is not None and digest != expected_sha256:
                    raise CryowaeInputError(f"{name}: sha256 of the download is {digest}, the "
                                            f"manifest says {expected_sha256}; nothing was written")
        except TimeoutError as exc:
            raise CryowaeInputError(f"{name}: download timed out after {n} bytes "
                                    f"({exc or 'no data'}); run fetch again") from None
        except (urllib.error.URLError, ConnectionError) as exc:
            raise CryowaeInputError(f"{name}: download interrupted after {n} bytes "
                                    f"({getattr(exc, 'reason', exc)}); run fetch again") from None
        finally:
            progress.finish()
    return n, digest


def fetch(manifest: Manifest | str | os.PathLike, directory: str | os.PathLike,
          only: Sequence[str] | None = None, progress: ProgressReporter | None = None,
          timeout: float = TIMEOUT) -> list[FetchResult]:
    """Download the entries of `manifest` (or those named in `only`) into `directory`.

    A file already present and matching the manifest (size, and SHA-256 where given)
    is kept. Messages (the SHA-256 of files the manifest does not pin, fallbacks taken)
    go to ``progress.log``. Raises `CryowaeInputError` on the first failure; files
    fetched before it stay.
    """
    progress = ensure_progress(progress)
    m = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
    entries = m.select(only)
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise CryowaeInputError(f"{d}: not a directory")
    d.mkdir(parents=True, exist_ok=True)
    results: list[FetchResult] = []
    for e in entries:
        dest = m.local_path(e, d)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file():
            check = verify_entry(e, d, path=dest)
            if check.ok:
                progress.log(f"{e.name}: {dest} is present and matches the manifest "
                             f"(size {check.size_check}, sha256 {check.hash_check})")
                results.append(FetchResult(e.name, dest, "present", check.size_bytes or 0,
                                           check.sha256))
                continue
            progress.log(f"{e.name}: {dest} does not match the manifest ({check.status}); "
                         "downloading it again")
        url = entry_url(e, timeout, progress)
        n, digest = download(url, dest, e.size_bytes, e.sha256, timeout, progress, e.name)
        if e.sha256 is None:
            progress.log(f"{e.name}: sha256 {digest} (the manifest has none; add it to pin "
                         "this file)")
        results.append(FetchResult(e.name, dest, "downloaded", n, digest, url))
    return results

