"""MRC and OME-Zarr I/O: round trips, laziness, atomic writes, and bad files."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import zarr

from cryowae.errors import CryowaeInputError
from cryowae.io import (
    check_finite,
    create_ome_zarr,
    read_mrc,
    read_mrc_header,
    read_ome_zarr,
    read_tilt_angles,
    read_volume,
    write_mrc,
    write_ome_zarr,
    write_volume,
)


def _vol(shape=(20, 24, 28), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_mrc_round_trip_keeps_voxel_size_origin_and_labels(tmp_path):
    a = _vol()
    write_mrc(tmp_path / "a.mrc", a, 8.5, origin=(10.0, 20.0, 30.0))
    with mrcfile.open(tmp_path / "a.mrc", "r+") as m:
        m.add_label("from IMOD")
    v = read_mrc(tmp_path / "a.mrc")
    assert isinstance(v.data, np.memmap)  # lazy
    assert np.array_equal(v.numpy(), a)
    assert v.voxel_size == pytest.approx(8.5)
    assert v.origin == pytest.approx((10.0, 20.0, 30.0))
    write_volume(tmp_path / "b.mrc", v)
    w = read_mrc(tmp_path / "b.mrc")
    assert "from IMOD" in w.meta["mrc_labels"] and w.origin == v.origin
    assert read_mrc_header(tmp_path / "a.mrc")["shape"] == (20, 24, 28)
    with mrcfile.open(tmp_path / "b.mrc") as m:
        assert m.header.mode == 2 and m.header.dmax == pytest.approx(a.max())


def test_int16_and_float16_modes_read(tmp_path):
    for dtype in (np.int16, np.float16, np.int8, np.uint16):
        p = tmp_path / f"{np.dtype(dtype).name}.mrc"
        with mrcfile.new(p) as m:
            m.set_data((np.arange(2 * 3 * 4).reshape(2, 3, 4) % 100).astype(dtype))
            m.voxel_size = 2.0
        assert read_volume(p).numpy().sum() == pytest.approx(
            float((np.arange(24) % 100).sum()))


@pytest.mark.parametrize("case", ["missing", "not_mrc", "truncated", "mode", "zero_voxel",
                                  "directory"])
def test_bad_mrc_files(case, tmp_path):
    p = tmp_path / "bad.mrc"
    if case == "not_mrc":
        p.write_text("hello, I am a text file and not a map" * 50)
    elif case == "truncated":
        write_mrc(p, _vol(), 5.0)
        p.write_bytes(p.read_bytes()[:2000])
    elif case == "mode":
        with mrcfile.new(p) as m:
            m.set_data(np.zeros((2, 4, 4), np.complex64))
            m.voxel_size = 1.0
    elif case == "zero_voxel":
        with mrcfile.new(p) as m:
            m.set_data(np.zeros((2, 4, 4), np.float32))
            m.voxel_size = 0.0
    elif case == "directory":
        p.mkdir()
    with pytest.raises(CryowaeInputError) as err:
        read_volume(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_nan_detected_slab_by_slab(tmp_path):
    a = _vol()
    a[17, 3, 4] = np.inf
    write_mrc(tmp_path / "n.mrc", a, 1.0)
    with pytest.raises(CryowaeInputError, match="NaN or infinite"):
        read_volume(tmp_path / "n.mrc", check_nan=True)
    check_finite(_vol())


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out.mrc"
    with pytest.raises(CryowaeInputError):
        write_mrc(out, np.zeros((4, 4)), 1.0)  # 2D: refused before anything is written
    with pytest.raises(ZeroDivisionError):
        with create_ome_zarr(tmp_path / "x.zarr", (8, 8, 8), 2.0) as w:
            w.level0[:4] = 1.0
            raise ZeroDivisionError
    assert not out.exists() and not (tmp_path / "x.zarr").exists()
    assert list(tmp_path.iterdir()) == []


def test_ome_zarr_round_trip_with_pyramid(tmp_path):
    a = _vol((40, 36, 52))
    write_ome_zarr(tmp_path / "a.zarr", a, 7.0, levels=3, chunks=(16, 16, 16))
    v = read_ome_zarr(tmp_path / "a.zarr")
    assert isinstance(v.data, zarr.Array) and v.voxel_size == pytest.approx(7.0)
    assert np.array_equal(np.asarray(v.data), a)
    levels = v.meta["levels"]
    assert [lv.shape for lv in levels] == [(40, 36, 52), (20, 18, 26), (10, 9, 13)]
    assert np.asarray(levels[1])[0, 0, 0] == pytest.approx(a[:2, :2, :2].mean(), rel=1e-5)
    assert read_ome_zarr(tmp_path / "a.zarr", level=1).voxel_size == pytest.approx(14.0)
    assert v.meta["axes"] == ["z", "y", "x"]
    assert v.data.chunks == (16, 16, 16)


def test_ome_zarr_family_axis(tmp_path):
    a = np.stack([_vol((8, 16, 16), s) for s in range(3)])
    write_ome_zarr(tmp_path / "f.zarr", a, 5.0, levels=2, extra_axes=("s",))
    v = read_ome_zarr(tmp_path / "f.zarr")
    assert v.meta["axes"] == ["s", "z", "y", "x"] and v.data.chunks[0] == 1
    assert np.allclose(np.asarray(v.data), a)


def test_read_zarr_v3_ngff_05(tmp_path):
    """A Zarr v3 store with NGFF 0.5 metadata (as the CryoET Data Portal publishes)."""
    g = zarr.open_group(str(tmp_path / "v3.zarr"), mode="w", zarr_format=3)
    g.create_array("0", data=_vol((8, 8, 8)))
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "angstrom"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": [13.48, 13.48, 13.48]}]}]}]}
    v = read_volume(tmp_path / "v3.zarr")
    assert v.voxel_size == pytest.approx(13.48) and v.shape == (8, 8, 8)


def test_tilt_files(tmp_path):
    p = tmp_path / "a.tlt"
    p.write_text("-60.0\n# comment\n0.0\n\n60.0\n")
    assert list(read_tilt_angles(p)) == [-60.0, 0.0, 60.0]
    p.write_text("-60\nabc\n")
    with pytest.raises(CryowaeInputError, match="not a tilt angle"):
        read_tilt_angles(p)


def test_release_pages_keeps_data_and_drops_resident_pages(tmp_path):
    """A pass over a memory-mapped output leaves it resident; release_pages drops it
    (the data stay in the file)."""
    from cryowae.io.mrc import open_mrc_writer, release_pages

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    path = tmp_path / "big.mrc"
    with open_mrc_writer(path, (64, 256, 256), 10.0) as out:  # 16 MiB
        for z in range(0, 64, 8):
            out[z:z + 8] = z
        before = rss_mb()
        assert release_pages(out)
        after = rss_mb()
        assert before - after > 10  # most of the 16 MiB left the process
        assert float(out[63, 0, 0]) == 56.0  # read back from the file
    assert not release_pages(np.zeros(4))
    vol = read_mrc(path)
    assert float(np.asarray(vol.data[40]).mean()) == 40.0
