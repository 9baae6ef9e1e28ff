"""Inputs as labs have them: TIFF stacks (with and without voxel-size metadata), the
voxel size of files that store none (``--voxel-size`` and the one-line note), and the
one-line message for a file that is no tomogram at all."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile

from cryowae.errors import CryowaeInputError
from cryowae.io import read_volume, voxel_size_of, write_mrc
from cryowae.io.formats import describe_bytes
from cryowae.io.voxel import given_voxel_size, resolve_voxel_size

from .conftest import invoke_cli

NOTE = "voxel size: none stored in {}; assuming 1.0 A (pass --voxel-size)"


def _stack(shape=(6, 10, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _notes(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("voxel size:")]


def test_plain_tiff_stack_is_memory_mapped_with_no_voxel_size(tmp_path):
    a = _stack()
    tifffile.imwrite(tmp_path / "t.tif", a)
    vol = read_volume(tmp_path / "t.tif")
    assert isinstance(vol.data, np.memmap) and vol.shape == (6, 10, 12)
    np.testing.assert_array_equal(np.asarray(vol.data), a)
    assert vol.voxel_size == 1.0 and vol.meta["voxel_source"] == "none"
    assert vol.meta["voxel_note"] == NOTE.format("t.tif")
    # a TIFF with an MRC suffix is still read as TIFF (was: "MRC mode 65540")
    tifffile.imwrite(tmp_path / "t.mrc", a)
    np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / "t.mrc").data), a)


def test_compressed_tiff_is_read_into_memory(tmp_path):
    a = _stack((5, 8, 8), seed=1).astype(np.int16)
    tifffile.imwrite(tmp_path / "z.tiff", a, compression="zlib")
    vol = read_volume(tmp_path / "z.tiff")
    assert not isinstance(vol.data, np.memmap) and vol.data.dtype == np.int16
    np.testing.assert_array_equal(vol.data, a)


@pytest.mark.parametrize("how, expected", [
    ("imagej", 40.0),      # 0.25 pixels per nm, ImageJ spacing 4 nm
    ("ome", 5.0),          # PhysicalSizeX 0.5 nm
    ("resolution", 10.0),  # 1e7 pixels per cm
])
def test_tiff_voxel_size_from_metadata(tmp_path, how, expected):
    a, p = _stack(), tmp_path / f"{how}.tif"
    if how == "imagej":
        tifffile.imwrite(p, a, imagej=True, resolution=(0.25, 0.25),
                         metadata={"spacing": 4.0, "unit": "nm", "axes": "ZYX"})
    elif how == "ome":
        size = {f"PhysicalSize{ax}": 0.5 for ax in "XYZ"}
        units = {f"PhysicalSize{ax}Unit": "nm" for ax in "XYZ"}
        tifffile.imwrite(p, a, ome=True, metadata={"axes": "ZYX"} | size | units)
    else:
        tifffile.imwrite(p, a, resolution=(1e7, 1e7), resolutionunit="CENTIMETER")
    vol = read_volume(p)
    assert vol.voxel_size == pytest.approx(expected) and "voxel_note" not in vol.meta
    assert vol.meta["voxel_source"] == how
    np.testing.assert_array_equal(np.asarray(vol.data), a)
    assert voxel_size_of(p) == (pytest.approx(expected), None)
    # a given voxel size replaces it, with a line naming both
    size, note = voxel_size_of(p, 12.0)
    assert size == 12.0 and note == (f"voxel size: {p.name} stores {expected:g} A; using "
                                     "--voxel-size 12 A")


def test_dpi_default_is_no_voxel_size(tmp_path):
    """72 pixels per inch (a writer's default) would be 3.5 mm per voxel: not stored."""
    tifffile.imwrite(tmp_path / "dpi.tif", _stack(), resolution=(72, 72),
                     resolutionunit="INCH")
    vol = read_volume(tmp_path / "dpi.tif")
    assert vol.voxel_size == 1.0 and vol.meta["voxel_note"] == NOTE.format("dpi.tif")


def test_colour_tiff_refused(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(CryowaeInputError, match="colour TIFF"):
        read_volume(tmp_path / "rgb.tif")


def test_resolve_voxel_size_rule():
    assert resolve_voxel_size(7.5, None, "a.mrc") == (7.5, None)
    assert resolve_voxel_size(7.5, 7.5, "a.mrc") == (7.5, None)
    assert resolve_voxel_size(None, 40.0, "t.tif") == (40.0, None)
    assert resolve_voxel_size(None, None, "/x/t.tif") == (1.0, NOTE.format("t.tif"))
    size, note = resolve_voxel_size(1.0, None, "a.mrc")
    assert size == 1.0 and "1 A (the value of files that set none) in a.mrc" in note
    assert resolve_voxel_size(1.0, 13.0, "a.mrc") == (13.0, None)  # 1 A is no voxel size
    with pytest.raises(CryowaeInputError, match="--voxel-size must be a positive"):
        resolve_voxel_size(None, -2.0, "t.tif")



def test_given_voxel_size_holds_within_its_block(tmp_path):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, _stack())
    with given_voxel_size(20.0):
        assert voxel_size_of(p) == (20.0, None) and read_volume(p).voxel_size == 20.0
    assert voxel_size_of(p) == (1.0, NOTE.format("t.tif"))


def test_mrc_with_zero_or_one_in_the_header(tmp_path):
    """Voxel size 0: refused without --voxel-size (as before), read with it; 1: kept,
    with the note."""
    zero, one = tmp_path / "zero.mrc", tmp_path / "one.mrc"
    with mrcfile.new(zero) as m:
        m.set_data(_stack())
        m.voxel_size = 0.0
    write_mrc(one, _stack(), 1.0)
    with pytest.raises(CryowaeInputError, match="pass --voxel-size"):
        read_volume(zero)
    assert read_volume(zero, voxel_size=8.0).voxel_size == 8.0
    with given_voxel_size(9.0):
        assert read_volume(zero).voxel_size == 9.0
    vol = read_volume(one)
    assert vol.voxel_size == 1.0
    assert vol.meta["voxel_note"].endswith("in one.mrc; assuming 1.0 A (pass --voxel-size)")


def test_inspect_tiff_voxel_size_flag_and_note(tmp_path):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, _stack((8, 16, 16)))
    res = invoke_cli("inspect", p, check=True)
    assert _notes(res.stderr) == [NOTE.format("t.tif")]
    assert "voxel size: 1 A" in res.stdout
    res = invoke_cli("inspect", p, "--voxel-size", "40", "--json", check=True)
    rep = json.loads(res.stdout)
    assert _notes(res.stderr) == [] and rep["voxel_size"] == 40.0
    assert rep["voxel_size_note"] is None and rep["shape"] == [8, 16, 16]
    res = invoke_cli("inspect", p, "--voxel-size", "0")
    assert res.returncode == 2 and "--voxel-size must be a positive" in res.stderr


def _write_other(path: Path, kind: str) -> None:
    if kind == "hdf5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(2000))
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif kind == "jpeg":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 4, 4), np.float32))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a.txt", "x")
    elif kind == "gzip":
        path.write_bytes(gzip.compress(bytes(5000)))
    elif kind == "text":
        path.write_text("# angles\n-60.0\n-57.0\n" * 100)
    else:
        path.write_bytes(bytes([0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]) * 10)


@pytest.mark.parametrize("kind, found", [
    ("hdf5", "HDF5 data"), ("png", "a PNG image"), ("jpeg", "a JPEG image"),
    ("npy", "a NumPy .npy array"), ("zip", "a ZIP archive"), ("gzip", "gzip-compressed"),
    ("text", "plain text"), ("bytes", "unknown bytes 0xde 0xad 0xbe 0xef 0x01"),
])
def test_wrong_format_named_in_one_line(tmp_path, kind, found):
    p = tmp_path / "tomo.mrc"
    _write_other(p, kind)
    res = invoke_cli("inspect", p)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"cryowae: error: {p}: not an MRC, TIFF or OME-Zarr")
    assert f"(found {found}" in lines[0] and "Traceback" not in res.stderr


def test_unsupported_mrc_mode_keeps_its_message(tmp_path):
    p = tmp_path / "c.mrc"
    with mrcfile.new(p) as m:
        m.set_data(np.zeros((2, 4, 4), np.complex64))
        m.voxel_size = 1.0
    res = invoke_cli("inspect", p)
    assert res.returncode == 2 and "MRC mode 4 (complex float32) is not supported" in res.stderr
    assert describe_bytes(b"") == "an empty file"


def test_restore_and_evaluate_take_the_voxel_size(tiny_model_path, tmp_path):
    """restore: a TIFF without metadata gives its output 1 A with the note, or the
    --voxel-size given; evaluate reports the given voxel size for TIFF inputs."""
    p = tmp_path / "t.tif"
    a = _stack((16, 32, 32), seed=3)
    tifffile.imwrite(p, a)
    tile = ["--tile", "32", "--overlap", "8", "--device", "cpu"]
    res = invoke_cli("restore", tiny_model_path, p, "--out", tmp_path / "a.mrc", *tile,
                     check=True)
    assert _notes(res.stderr) == [NOTE.format("t.tif")]
    assert read_volume(tmp_path / "a.mrc").voxel_size == 1.0
    res = invoke_cli("restore", tiny_model_path, p, "--out", tmp_path / "b.mrc", *tile,
                     "--voxel-size", "10", check=True)
    assert _notes(res.stderr) == [] and read_volume(tmp_path / "b.mrc").voxel_size == 10.0
    gt = tmp_path / "gt.tif"
    tifffile.imwrite(gt, a)
    res = invoke_cli("evaluate", p, "--gt", gt, "--tilt-min", "-60", "--tilt-max", "60",
                     "--voxel-size", "10", "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["voxel_size_A"] == 10.0 and rep["pearson"] == pytest.approx(1.0)
    res = invoke_cli("evaluate", p, "--gt", gt, "--tilt-min", "-60", "--tilt-max", "60",
                     "--json", check=True)
    assert json.loads(res.stdout)["voxel_size_A"] == 1.0
    assert _notes(res.stderr) == [NOTE.format("gt.tif")]


@pytest.mark.slow
def test_sample_takes_the_voxel_size(tiny_model_path, tmp_path):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, _stack((16, 32, 32), seed=4))
    fam = tmp_path / "fam"
    res = invoke_cli("sample", tiny_model_path, p, "--out", fam, "--n", "2", "--sampler",
                     "rotations", "--tile", "32", "--overlap", "8", "--device", "cpu",
                     "--consistency", "none", "--spread-calibration", "none",
                     "--voxel-size", "10", check=True)
    assert _notes(res.stderr) == []
    assert json.loads((fam / "family.json").read_text())["voxel_size"] == 10.0
    assert read_volume(fam / "mean.mrc").voxel_size == 10.0


@pytest.mark.slow(seconds=8)  # a 1-step training run (its final codes take the time)
def test_train_takes_the_voxel_size(tmp_path):
    p = tmp_path / "t.tif"
    tifffile.imwrite(p, _stack((24, 40, 40), seed=4))
    res = invoke_cli("train", p, "--out", tmp_path / "run", "--device", "cpu",
                     "--patch-size", "16", "--batch-size", "2", "--steps", "1",
                     "--divergence", "none", "--no-family", "--tilt-min", "-60",
                     "--tilt-max", "60", "--voxel-size", "12.5", check=True)
    from cryowae.models.checkpoint import load_restorer

    assert _notes(res.stderr) == [] and load_restorer(tmp_path / "run").voxel_size == 12.5
