"""Intensity scales and storage modes: a tomogram under an affine intensity map
``a * x + b`` (a > 0), or stored as int8/uint8/int16/uint16/float16 (MRC modes 0, 1, 6,
12; OME-Zarr with those dtypes), restores to the float32 original's restoration under
the same map; unsupported MRC modes are one-line input errors."""

from __future__ import annotations

import struct
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml

from cryowae.inference.restore import restore_array
from cryowae.io import read_mrc, read_volume, write_mrc
from cryowae.io.mrc import IMOD_STAMP
from cryowae.io.stats import volume_stats
from cryowae.models.checkpoint import load_restorer

from .conftest import invoke_cli

ORIGIN = (30.0, -20.0, 10.0)  # (z, y, x) Angstrom
VOXEL = 10.0
TRAIN = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
         "bank_size": 64, "log_every": 5, "checkpoint_every": 100, "lr": 5e-3,
         "check_prior_preference": False, "family": False}
TILES = ("--tile", "32", "--overlap", "8", "--device", "cpu")
# the module fixture trains a model (8 s measured): outside the fast lane
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(small_sim, tmp_path_factory) -> dict:
    """The simulated tomogram (float32, 32x48x48), a model trained 12 steps on it, and
    the float32 restoration every other case is compared with."""
    d = tmp_path_factory.mktemp("intensity")
    with read_mrc(small_sim / "tomo.mrc") as vol:
        x = vol.numpy()
    src = d / "orig.mrc"
    write_mrc(src, x, VOXEL, origin=ORIGIN)
    (d / "train.yaml").write_text(yaml.safe_dump({"train": TRAIN}))
    invoke_cli("train", src, "--out", d / "run", "--config", d / "train.yaml", "--steps",
               "12", "--seed", "3", "--device", "cpu", check=True)
    ref = _restore(d / "run", src, d / "orig_restored.mrc")
    return {"dir": d, "x": x, "model": d / "run", "ref": ref}


def _restore(model: Path, src: Path, out: Path) -> np.ndarray:
    invoke_cli("restore", model, src, "-o", out, *TILES, check=True)
    with read_volume(out) as vol:
        assert vol.data.dtype == np.float32
        assert vol.voxel_size == pytest.approx(VOXEL)
        assert vol.origin == pytest.approx(ORIGIN)
        return vol.numpy()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def _off_map(out: np.ndarray, ref: np.ndarray, a: float, b: float) -> float:
    """RMS of ``out - (a * ref + b)`` in units of ``a * std(ref)``."""
    ref = ref.astype(np.float64)
    return float(np.sqrt(np.mean((out - (a * ref + b)) ** 2)) / (a * ref.std()))


def _write_mrc_as(path: Path, data: np.ndarray) -> None:
    """An MRC file of `data`'s own dtype (mode 0/1/2/6/12), voxel size and origin set."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = VOXEL
        mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = ORIGIN


def _write_zarr_as(path: Path, data: np.ndarray) -> None:
    """An NGFF 0.4 store of `data`'s own dtype (one level, scale = voxel size in A)."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("0", data=data, chunks=(16, 16, 16))
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
    write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [VOXEL] * 3},
        {"type": "translation", "translation": list(ORIGIN)}]}], fmt=FormatV04(), axes=axes)


def _quantised(x: np.ndarray, dtype: str, half_range: float, centre: float,
               by: str = "std") -> tuple[np.ndarray, float, float]:
    """``round(a * x + b)`` in `dtype`, with ``a * x + b`` centred on `centre` and
    `half_range` times the std (or the max deviation) wide: (stored, a, b)."""
    m = float(x.mean())
    spread = float(x.std()) if by == "std" else float(np.abs(x - m).max())
    a = half_range / spread
    b = centre - a * m
    y = a * x.astype(np.float64) + b
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    assert y.min() >= info.min and y.max() <= info.max  # the case itself does not clip
    return np.round(y).astype(dtype) if np.dtype(dtype).kind in "iu" else y.astype(dtype), a, b


def _case(name: str, x: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored array, a, b) of each case: stored ~= a * x + b."""
    plain = {"x1e-3": (1e-3, 0.0), "x1e3": (1e3, 0.0), "+5000": (1.0, 5000.0),
             "-300": (1.0, -300.0), "x1000+5000": (1000.0, 5000.0)}
    if name in plain:
        a, b = plain[name]
        return (a * x.astype(np.float64) + b).astype(np.float32), a, b
    dtype = name.split("-")[0]
    if dtype == "int8":  # the full signed byte range
        return _quantised(x, "int8", 127.0, 0.0, by="max")
    if dtype == "uint8":  # unsigned bytes, as IMOD writes mode 0
        return _quantised(x, "uint8", 127.0, 128.0, by="max")
    if dtype == "int16":
        return _quantised(x, "int16", 2000.0, -1000.0)
    if dtype == "uint16":  # a camera-like offset: mean ~40000
        return _quantised(x, "uint16", 1000.0, 40000.0)
    if dtype == "float16":  # values ~20000: squares and sums overflow float16
        return _quantised(x, "float16", 1000.0, 20000.0)
    raise AssertionError(name)


#: case -> (stored as, largest residual RMS off ``a * ref + b`` in units of a * std(ref)).
#: Measured on this setup: x1e-3, x1e3 1.4e-7; +5000 5.8e-4 (float32 itself rounds
#: x + 5000 by 2.8e-4 of std(x) = 0.51, once in the input and once in the output); -300
#: 4.2e-5; x1000+5000 5.6e-7; int8 and uint8 7.2e-3 (256 levels); int16 9.1e-5; uint16
#: 1.8e-4; float16 2.9e-3 (11-bit mantissa at ~20000); the zarr cases as their MRC ones.
CASES = {
    "x1e-3": ("mrc", 1e-5), "x1e3": ("mrc", 1e-5), "+5000": ("mrc", 2e-3),
    "-300": ("mrc", 2e-3), "x1000+5000": ("mrc", 1e-4),
    "int8": ("mrc", 0.02), "uint8": ("mrc", 0.02), "int16": ("mrc", 5e-4),
    "uint16": ("mrc", 1e-3), "float16": ("mrc", 1e-2),
    "int16-zarr": ("zarr", 5e-4), "uint16-zarr": ("zarr", 1e-3),
}


def _stored(setup: dict, name: str) -> tuple[Path, np.ndarray, float, float]:
    data, a, b = _case(name, setup["x"])
    kind = CASES[name][0]
    path = setup["dir"] / f"{name}.{kind}"
    if kind == "zarr":
        _write_zarr_as(path, data)
    else:
        _write_mrc_as(path, data.view(np.int8) if data.dtype == np.uint8 else data)
        if data.dtype == np.uint8:  # IMOD's stamp without the signed-bytes flag
            with mrcfile.open(path, mode="r+") as mrc:
                extra = bytearray(bytes(mrc.header.extra2))
                extra[40:48] = np.array([IMOD_STAMP, 0], "<i4").tobytes()
                mrc.header.extra2 = bytes(extra)
    with read_volume(path) as vol:  # read back as stored: same dtype, same values
        assert vol.data.dtype == data.dtype
        assert np.array_equal(np.asarray(vol.data), data)
    return path, data, a, b


@pytest.mark.parametrize("name", list(CASES))
def test_scaled_or_stored_tomogram_restores_to_the_mapped_restoration(setup, name):
    path, _, a, b = _stored(setup, name)
    out = _restore(setup["model"], path, setup["dir"] / f"{name}_restored.mrc")
    ref = setup["ref"].astype(np.float64)
    r = _pearson(out, ref)
    # the output follows the input's map: out ~= a * ref + b
    scale = a * ref.std()
    resid = _off_map(out, ref, a, b)
    slope, intercept = np.polyfit(ref.ravel(), out.ravel().astype(np.float64), 1)
    print(f"{name}: pearson {r:.10f}, residual {resid:.2e} of a*std, slope/a "
          f"{slope / a:.6f}, (intercept - b)/(a*std) {(intercept - b) / scale:.2e}")
    assert r > 0.999
    assert resid < CASES[name][1]
    assert slope / a == pytest.approx(1.0, abs=10 * CASES[name][1])


def test_the_model_is_not_affine_in_its_input(setup):
    """What the cases rely on: normalisation. Restoring the x1000+5000 tomogram with the
    original's statistics instead of its own gives another restoration, not the
    original's up to an affine map (measured: Pearson 0.996 to the original's against
    1 - 1e-10 with its own statistics)."""
    restorer = load_restorer(setup["model"], "cpu")
    data, a, b = _case("x1000+5000", setup["x"])
    wrong = restore_array(restorer, data, tile=32, overlap=8,
                          norm=volume_stats(setup["x"]))
    right = restore_array(restorer, data, tile=32, overlap=8)
    ref = setup["ref"]
    print(f"Pearson with the original's statistics {_pearson(wrong, ref):.10f}, with its "
          f"own {_pearson(right, ref):.10f}")
    assert 1 - _pearson(right, ref) < 1e-6
    assert 1 - _pearson(wrong, ref) > 1e-3


def test_unsigned_bytes_without_the_imod_stamp_follow_the_header_range(tmp_path, setup):
    """Old mode-0 files hold unsigned bytes without IMOD's stamp: header min >= 0 and
    max > 127 (impossible for int8) mark them; read as signed they restore to noise."""
    data, _, _ = _case("uint8", setup["x"])
    path = tmp_path / "old.mrc"
    _write_mrc_as(path, data.view(np.int8))
    with mrcfile.open(path, mode="r+") as mrc:
        mrc.header.dmin, mrc.header.dmax = float(data.min()), float(data.max())
    with read_mrc(path) as vol:
        assert vol.data.dtype == np.uint8 and vol.meta["mrc_mode0_unsigned"]
        assert np.array_equal(np.asarray(vol.data), data)
    restorer = load_restorer(setup["model"], "cpu")
    as_signed = restore_array(restorer, data.view(np.int8), tile=32, overlap=8)
    assert _pearson(as_signed, setup["ref"]) < 0.9
    # a signed file (header min < 0) stays signed
    signed, _, _ = _case("int8", setup["x"])
    _write_mrc_as(tmp_path / "signed.mrc", signed)
    with read_mrc(tmp_path / "signed.mrc") as vol:
        assert vol.data.dtype == np.int8 and "mrc_mode0_unsigned" not in vol.meta


def test_float16_statistics_do_not_overflow():
    """Values ~20000: float16 squares overflow at 65504; the statistics are float64."""
    rng = np.random.default_rng(0)
    x = (20000 + 1000 * rng.normal(size=(8, 16, 16))).astype(np.float16)
    with np.errstate(over="ignore"):
        assert np.isinf(np.sum(x**2))  # what a float16 accumulation gives
    mean, std = volume_stats(x)
    assert np.isfinite(std) and 900 < std < 1100
    ref_mean, ref_std = volume_stats(x.astype(np.float64))
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9)


@pytest.mark.parametrize("mode", [3, 4, 16, 101])
def test_unsupported_modes_exit_2_with_one_line(setup, tmp_path, mode):
    path = tmp_path / f"mode{mode}.mrc"
    if mode == 4:
        _write_mrc_as(path, np.ones((8, 16, 16), np.complex64))
    else:  # no numpy dtype for these: a float32 file whose header says the mode
        _write_mrc_as(path, np.ones((8, 16, 16), np.float32))
        with open(path, "r+b") as f:
            f.seek(12)
            f.write(struct.pack("<i", mode))
    res = invoke_cli("restore", setup["model"], path, "-o", tmp_path / "out.mrc", *TILES)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"MRC mode {mode} (" in lines[0] and "supported" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out.mrc").exists()
