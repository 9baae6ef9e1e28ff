"""Data manifests: schema validation, verification, and fetch (local server only)."""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import http.server
import io
import os
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import yaml

import cryowae.data.fetch as fetch_mod
from cryowae.data.fetch import download, fetch
from cryowae.data.manifest import load_manifest, parse_manifest
from cryowae.data.structures import EXAMPLE_STRUCTURES, Archive, fetch_example_structures
from cryowae.data.verify import sha256_file, verify
from cryowae.errors import CryowaeInputError

from .conftest import invoke_cli, run_cli

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "data_manifests" / "public_tomograms.yaml"


def _entry(**over):
    e = {
        "name": "toy", "source": {"type": "empiar", "empiar_id": 10988, "path": "data/a.mrc"},
        "voxel_size_A": 10.0, "tilt_min": -60, "tilt_max": 60, "file_name": "a.mrc",
        "size_bytes": None, "sha256": None, "url": None, "license": "CC0-1.0",
        "citation": "Someone et al. (2024)",
    }
    e.update(over)
    return e


def _write_manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"schema_version": 1, "entries": entries}))
    return path


@pytest.fixture()
def files(tmp_path):
    """Three small files and a manifest describing them (one with a wrong hash)."""
    d = tmp_path / "data"
    d.mkdir()
    good = b"cryowae" * 1000
    (d / "good.bin").write_bytes(good)
    (d / "short.bin").write_bytes(b"x" * 10)
    (d / "tampered.bin").write_bytes(b"y" * 100)
    (d / "nohash.bin").write_bytes(b"z" * 5)
    entries = [
        _entry(name="good", file_name="good.bin", size_bytes=len(good),
               sha256=hashlib.sha256(good).hexdigest()),
        _entry(name="missing", file_name="missing.bin", size_bytes=3),
        _entry(name="short", file_name="short.bin", size_bytes=11),
        _entry(name="tampered", file_name="tampered.bin", size_bytes=100,
               sha256=hashlib.sha256(b"z" * 100).hexdigest()),
        _entry(name="nohash", file_name="nohash.bin", size_bytes=5, sha256=None),
    ]
    return _write_manifest(tmp_path / "m.yaml", entries), d


# ---------------------------------------------------------------------------- schema


def test_shipped_manifest_is_valid():
    m = load_manifest(SHIPPED)
    assert len(m.entries) >= 2
    kinds = {e.source_type for e in m.entries}
    assert kinds == {"cryoet-data-portal", "empiar"}
    for e in m.entries:
        assert e.voxel_size_A > 0 and e.tilt_min < e.tilt_max
        assert e.license and e.citation
        assert e.download_url().startswith("https://")
        assert e.sha256 is None or len(e.sha256) == 64


@pytest.mark.parametrize("change, field", [
    ({"voxel_size_A": -1}, "voxel_size_A"),
    ({"voxel_size_A": "ten"}, "voxel_size_A"),
    ({"tilt_min": 70, "tilt_max": 60}, "tilt_min"),
    ({"sha256": "abc"}, "sha256"),
    ({"size_bytes": 0}, "size_bytes"),
    ({"file_name": "../escape.mrc"}, "file_name"),
    ({"url": "ftp://example.org/a"}, "url"),
    ({"name": "has space"}, "name"),
    ({"license": None}, "license"),
    ({"shape": [1, 2]}, "shape"),
    ({"tilt_axis": "z"}, "tilt_axis"),
    ({"colour": "blue"}, "colour"),
    ({"source": {"type": "zenodo"}}, "source.type"),
    ({"source": {"type": "empiar", "path": "a"}}, "source.empiar_id"),
    ({"source": {"type": "cryoet-data-portal", "dataset_id": 10000}}, "source"),
    ({"source": {"type": "cryoet-data-portal", "dataset_id": "x", "run_name": "TS"}},
     "source.dataset_id"),
    ({"source": {"type": "empiar", "empiar_id": 1, "path": "a", "run_id": 3}}, "source.run_id"),
])
def test_schema_errors_name_entry_and_field(tmp_path, change, field):
    broken = _entry(name="broken", file_name="b.mrc")
    broken.update(change)
    p = _write_manifest(tmp_path / "bad.yaml", [_entry(name="ok-one"), broken])
    with pytest.raises(CryowaeInputError) as info:
        load_manifest(p)
    msg = str(info.value)
    assert f"'{field}'" in msg and str(p) in msg
    if "name" not in change:
        assert "'broken'" in msg


@pytest.mark.parametrize("data, needle", [
    ([1, 2], "mapping"),
    ({"entries": []}, "non-empty"),
    ({"schema_version": 2, "entries": [_entry()]}, "schema_version"),
    ({"entries": [_entry()], "extra": 1}, "extra"),
    ({"entries": [_entry(), _entry(file_name="b.mrc")]}, "repeats"),
    ({"entries": [_entry(), _entry(name="other")]}, "file_name"),
])
def test_manifest_level_errors(data, needle):
    with pytest.raises(CryowaeInputError, match=needle):
        parse_manifest(data, "x.yaml")


def test_load_errors(tmp_path):
    with pytest.raises(CryowaeInputError, match="no such manifest"):
        load_manifest(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("entries: [\n  - name: a\n   oops")
    with pytest.raises(CryowaeInputError, match="not valid YAML"):
        load_manifest(bad)


def test_empiar_id_string_and_default_url():
    m = parse_manifest({"entries": [_entry(source={"type": "empiar", "empiar_id": "EMPIAR-10045",
                                                    "path": "/data/t.rec"})]})
    e = m.entries[0]
    assert e.source["empiar_id"] == 10045
    assert e.download_url() == ("https://ftp.ebi.ac.uk/empiar/world_availability/10045/"
                                "data/t.rec")


# ---------------------------------------------------------------------------- verify


def test_verify_catches_missing_size_and_hash(files):
    manifest, d = files
    results = {r.name: r for r in verify(manifest, d)}
    assert results["good"].status == "ok"
    assert (results["good"].size_check, results["good"].hash_check) == ("ok", "ok")
    assert results["missing"].status == "missing"
    assert results["short"].status == "size mismatch"
    assert results["short"].size_check == "mismatch"
    assert results["tampered"].status == "hash mismatch"
    assert results["tampered"].size_check == "ok"
    assert results["nohash"].ok and results["nohash"].hash_check == "unchecked"
    assert results["nohash"].size_check == "ok"
    assert [r.ok for r in verify(manifest, d, names=["good", "nohash"])] == [True, True]


def test_sha256_is_streamed_in_chunks(tmp_path):
    p = tmp_path / "f.bin"
    data = bytes(range(256)) * 300
    p.write_bytes(data)
    seen = []
    assert sha256_file(p, chunk=1000, on_chunk=seen.append) == hashlib.sha256(data).hexdigest()
    assert len(seen) == 77 and sum(seen) == len(data)


def test_select_unknown_name(files):
    manifest, _ = files
    with pytest.raises(CryowaeInputError, match="no entry named 'nope'"):
        load_manifest(manifest).select(["nope"])


# ----------------------------------------------------------------------------- fetch


@pytest.fixture()
def server(tmp_path):
    """A loopback HTTP server over a folder; yields (base url, folder)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # a short poll interval: shutdown() waits for the loop's next poll (0.5 s by default)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_downloads_verifies_and_skips_present(tmp_path, server):
    base, root = server
    payload = b"tomogram" * 50_000
    (root / "t.mrc").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    manifest = _write_manifest(tmp_path / "m.yaml", [
        _entry(name="t", file_name="t.mrc", url=f"{base}/t.mrc", size_bytes=len(payload),
               sha256=digest),
        _entry(name="u", file_name="u.mrc", url=f"{base}/t.mrc"),  # nothing pinned
    ])
    out = tmp_path / "out"
    res = fetch(manifest, out, only=["t"], timeout=5)
    assert [r.action for r in res] == ["downloaded"]
    assert (out / "t.mrc").read_bytes() == payload and res[0].sha256 == digest
    assert verify(manifest, out, names=["t"])[0].ok
    res = fetch(manifest, out, timeout=5)
    assert [r.action for r in res] == ["present", "downloaded"]
    assert res[1].sha256 == digest
    assert sorted(p.name for p in out.iterdir()) == ["t.mrc", "u.mrc"]  # no temp files


def test_fetch_hash_or_size_mismatch_leaves_nothing(tmp_path, server):
    base, root = server
    (root / "t.mrc").write_bytes(b"a" * 1000)
    out = tmp_path / "out"
    bad_hash = _write_manifest(tmp_path / "h.yaml", [_entry(
        file_name="t.mrc", url=f"{base}/t.mrc", size_bytes=1000, sha256="0" * 64)])
    with pytest.raises(CryowaeInputError, match="sha256"):
        fetch(bad_hash, out, timeout=5)
    bad_size = _write_manifest(tmp_path / "s.yaml", [_entry(
        file_name="t.mrc", url=f"{base}/t.mrc", size_bytes=999)])
    with pytest.raises(CryowaeInputError, match="999"):
        fetch(bad_size, out, timeout=5)
    assert list(out.iterdir()) == []


def test_fetch_http_error(tmp_path, server):
    base, _ = server
    with pytest.raises(CryowaeInputError, match="HTTP 404"):
        download(f"{base}/absent.mrc", tmp_path / "x.mrc", timeout=5)
    assert not (tmp_path / "x.mrc").exists()


def test_fetch_without_network_fails_fast(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(fetch_mod.socket, "create_connection", refuse)
    manifest = _write_manifest(tmp_path / "m.yaml", [_entry(url="https://example.org/a.mrc")])
    with pytest.raises(CryowaeInputError, match="no network: cannot reach example.org:443"):
        fetch(manifest, tmp_path / "out", timeout=1)


def test_portal_entry_without_client_or_url(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryoet_data_portal", None)  # import fails
    src = {"type": "cryoet-data-portal", "dataset_id": 10000, "run_name": "TS_026"}
    manifest = _write_manifest(tmp_path / "m.yaml", [_entry(source=src)])
    with pytest.raises(CryowaeInputError, match=r"install cryowae\[portal\]"):
        fetch(manifest, tmp_path / "out", timeout=1)


def test_portal_entry_without_client_falls_back_to_url(tmp_path, server, monkeypatch):
    monkeypatch.setitem(sys.modules, "cryoet_data_portal", None)
    base, root = server
    (root / "p.mrc").write_bytes(b"p" * 10)
    src = {"type": "cryoet-data-portal", "dataset_id": 10000, "run_name": "TS_026"}
    manifest = _write_manifest(tmp_path / "m.yaml", [_entry(source=src, url=f"{base}/p.mrc",
                                                            size_bytes=10)])
    res = fetch(manifest, tmp_path / "out", timeout=5)
    assert res[0].action == "downloaded"


# ------------------------------------------------------------------------------- CLI


def test_cli_verify_table_and_exit_codes(files, tmp_path):
    manifest, d = files
    # the one real process of this file: exit code 1 from the installed entry point
    proc = run_cli("data", "verify", manifest, d, timeout=300)
    assert proc.returncode == 1, proc.stderr
    for word in ("OK", "missing", "size mismatch", "hash mismatch", "unchecked"):
        assert word in proc.stdout
    ok_only = _write_manifest(tmp_path / "ok.yaml", [_entry(
        name="good", file_name="good.bin", size_bytes=(d / "good.bin").stat().st_size)])
    proc = invoke_cli("data", "verify", ok_only, d)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_data_errors_are_one_line(files, tmp_path):
    manifest, d = files
    bad = _write_manifest(tmp_path / "bad.yaml", [_entry(voxel_size_A=-2)])
    for args in (("data", "verify", bad, d), ("data", "fetch", manifest, d, "--only", "nope"),
                 ("data", "verify", tmp_path / "none.yaml", d), ("data", "fetch", "--bogus")):
        proc = invoke_cli(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cryowae: error:"), proc.stderr
        assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ example structures


def _fake_structure_archive(path: Path, skip: str = "") -> dict[str, bytes]:
    """A .tar.gz laid out like the mdanalysistests source package, with a small text
    per example structure (compressed like the real members); returns the texts."""
    texts = {}
    with tarfile.open(path, "w:gz") as tf:
        for name, member in EXAMPLE_STRUCTURES.items():
            text = f"REMARK   1 {name}\nEND\n".encode()
            texts[name] = text
            if member == skip:
                continue
            data = (gzip.compress(text) if member.endswith(".gz")
                    else bz2.compress(text) if member.endswith(".bz2") else text)
            info = tarfile.TarInfo(f"mdanalysistests-0/MDAnalysisTests/data/{member}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return texts


def _archive(path: Path, url: str, sha256: str | None = None) -> Archive:
    return Archive(url=url, file_name="mda.tar.gz", size_bytes=path.stat().st_size,
                   sha256=sha256 or sha256_file(path))


def test_example_structures_download_through_fetch(tmp_path, server):
    base, root = server
    texts = _fake_structure_archive(root / "mda.tar.gz")
    arch = _archive(root / "mda.tar.gz", f"{base}/mda.tar.gz")
    cache, dest = tmp_path / "cache", tmp_path / "pdb"
    paths = fetch_example_structures(dest, cache_dir=cache, archive=arch, timeout=5)
    assert [p.name for p in paths] == list(EXAMPLE_STRUCTURES)
    assert all(p.read_bytes() == texts[p.name] for p in paths)
    assert sorted(p.name for p in cache.iterdir()) == ["mda.tar.gz"]  # no temporaries
    # the cached archive is used: the server no longer has it
    (root / "mda.tar.gz").unlink()
    paths[2].unlink()
    assert fetch_example_structures(dest, cache_dir=cache, archive=arch, timeout=5) == paths
    assert paths[2].read_bytes() == texts[paths[2].name]


def test_example_structures_refuse_a_changed_archive(tmp_path, server):
    base, root = server
    _fake_structure_archive(root / "mda.tar.gz")
    wrong = _archive(root / "mda.tar.gz", f"{base}/mda.tar.gz", sha256="0" * 64)
    with pytest.raises(CryowaeInputError, match="sha256"):
        fetch_example_structures(tmp_path / "pdb", cache_dir=tmp_path / "c", archive=wrong,
                                 timeout=5)
    assert list((tmp_path / "c").iterdir()) == [] and not (tmp_path / "pdb").exists()
    _fake_structure_archive(root / "mda.tar.gz", skip="6msm.pdb.bz2")
    partial = _archive(root / "mda.tar.gz", f"{base}/mda.tar.gz")
    with pytest.raises(CryowaeInputError, match="holds no MDAnalysisTests/data/6msm.pdb.bz2"):
        fetch_example_structures(tmp_path / "pdb", cache_dir=tmp_path / "c", archive=partial,
                                 timeout=5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CRYOWAE_TEST_NETWORK"),
                    reason="downloads 60 MB from PyPI; set CRYOWAE_TEST_NETWORK=1")
def test_fetch_example_structures_from_pypi(tmp_path):
    from cryowae.simulation.potential import read_atomic_model

    paths = fetch_example_structures(tmp_path / "pdb", cache_dir=tmp_path / "cache")
    assert [p.name for p in paths] == list(EXAMPLE_STRUCTURES)
    diam = [2 * read_atomic_model(p).radius / 10 for p in paths]
    assert diam == sorted(diam) and 5 < diam[0] and diam[-1] < 25
    elements = read_atomic_model(paths[1]).atomic_numbers.unique().tolist()
    assert 48 not in elements and 20 not in elements  # adk_open: no Cd or Ca guessed
