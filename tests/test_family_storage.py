"""How a family is stored (`StorageSettings`): float16 samples by default and float32 on
request, moments from the float32 samples, `keep` K of N samples with the moments of
all N, the size of the default family on disk, and the napari reader on it."""

from __future__ import annotations

import json
import os

import mrcfile
import numpy as np
import pytest

from cryowae.errors import CryowaeInputError
from cryowae.io import read_mrc, read_ome_zarr, write_mrc
from cryowae.sampling import sample_file
from cryowae.sampling.settings import (
    CalibrationSettings,
    SamplerSettings,
    StorageSettings,
    float16_fits,
)

from .test_napari_plugin import _rendered, needs_napari, viewer, virtual_display  # noqa: F401
from .test_sampling import _settings, _tomogram, stochastic_restorer

#: no calibration, no check: what these tests measure is the storage
PLAIN = CalibrationSettings("none", "none")


def _tomo(tmp_path, shape=(24, 40, 36)):
    path = tmp_path / "tomo.mrc"
    write_mrc(path, _tomogram(shape) - 7.0, voxel_size=10.0)  # centred, as real tomograms
    return path


def _size(path) -> int:
    """Bytes of the files under a folder (``du --apparent-size``: file system blocks
    left out, which depend on the file system, not on the family)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.stat(os.path.join(root, f)).st_size for f in files)
    return total


def test_float16_fits_known_cases():
    # half a float16 step at |mean| + 5 std is 2^-11 of it: <= 0.005 std up to
    # |mean| + 5 std = 10.24 std
    assert float16_fits((0.0, 1.0)) and float16_fits((5.2, 1.0))
    assert not float16_fits((5.3, 1.0))
    assert not float16_fits((0.0, 2e4))  # 5 std beyond float16's largest value
    assert float16_fits((-3e-3, 1e-3))


def test_storage_settings_are_validated():
    with pytest.raises(CryowaeInputError, match="--sample-dtype 'int8'"):
        StorageSettings(sample_dtype="int8")
    with pytest.raises(CryowaeInputError, match="--keep"):
        StorageSettings(keep=0)
    with pytest.raises(CryowaeInputError, match="more than the family's 3"):
        StorageSettings(keep=4).kept(3)
    with pytest.raises(CryowaeInputError, match="unknown --sampler"):
        SamplerSettings(2, "ot")
    with pytest.raises(CryowaeInputError, match="unknown spread calibration"):
        CalibrationSettings("wide")
    assert StorageSettings().chunks((80, 128, 300)) == (1, 4, 128, 256)


@pytest.mark.slow  # 3-9 s on one worker
def test_float16_by_default_float32_on_request_moments_from_float32(tmp_path):
    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    half = sample_file(r, tomo, tmp_path / "half", _settings(3), PLAIN)
    full = sample_file(r, tomo, tmp_path / "full", _settings(3), PLAIN,
                       StorageSettings(sample_dtype="float32", std_dtype="float32"))
    a, b = (read_ome_zarr(d / "samples.zarr") for d in (half, full))
    assert a.data.dtype == np.float16 and b.data.dtype == np.float32
    assert len(a.meta["levels"]) == 1 and a.data.chunks == (1, 4, 40, 36)
    assert a.data.compressors[0].cname == "zstd"
    x32 = np.asarray(b.data)
    # float16 rounds to 2^-11 relative, and to half its subnormal step 2^-24 below 2^-14
    np.testing.assert_allclose(np.asarray(a.data, np.float32), x32, rtol=2.0 ** -11,
                               atol=2.0 ** -25)
    # the moments of the float16 family are those of the float32 samples, not of the
    # rounded ones
    np.testing.assert_allclose(read_mrc(half / "mean.mrc").numpy(), x32.mean(0), atol=1e-6)
    with mrcfile.open(half / "std.mrc") as f:
        assert f.header.mode == 12
        std16 = np.asarray(f.data, np.float32)
    np.testing.assert_allclose(std16, x32.std(0), rtol=2.0 ** -11, atol=1e-7)
    np.testing.assert_allclose(read_mrc(full / "std.mrc").numpy(), x32.std(0), atol=1e-6)
    meta = json.loads((half / "family.json").read_text())
    assert meta["sample_dtype"] == "float16" and meta["samples_stored"] == 3


@pytest.mark.slow  # 3-9 s on one worker
def test_float16_falls_back_to_float32_for_an_offset_tomogram(tmp_path):
    """Values at mean 7, std 1: float16 would round them by 0.7% of the std."""
    r = stochastic_restorer()
    tomo = tmp_path / "offset.mrc"
    write_mrc(tomo, _tomogram(), voxel_size=10.0)
    messages: list[str] = []
    from cryowae.progress import ProgressReporter

    log = ProgressReporter()
    log.log = messages.append  # type: ignore[method-assign]
    fam = sample_file(r, tomo, tmp_path / "fam", _settings(2), PLAIN, progress=log)
    assert read_ome_zarr(fam / "samples.zarr").data.dtype == np.float32
    assert any("samples stored as float32" in m for m in messages)


@pytest.mark.slow  # 6 s: two calibrated families
def test_keep_stores_k_samples_and_moments_use_all_n(tmp_path):
    """--keep 2 of 4: the store holds samples 0 and 1, the mean, std and calibration are
    those of the whole calibrated family, computed here from the 4 float32 samples of
    the run that keeps them all."""
    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    full = sample_file(r, tomo, tmp_path / "full", _settings(4),
                       storage=StorageSettings(sample_dtype="float32"))
    kept = sample_file(r, tomo, tmp_path / "kept", _settings(4),
                       storage=StorageSettings(keep=2))
    x = np.asarray(read_ome_zarr(full / "samples.zarr").data)
    k = read_ome_zarr(kept / "samples.zarr").data
    assert k.shape == (2, *x.shape[1:]) and k.dtype == np.float16
    np.testing.assert_allclose(np.asarray(k, np.float32), x[:2], rtol=2.0 ** -11,
                               atol=2.0 ** -25)
    np.testing.assert_allclose(read_mrc(kept / "mean.mrc").numpy(), x.mean(0), atol=1e-5)
    np.testing.assert_allclose(read_mrc(kept / "std.mrc").numpy(), x.std(0),
                               rtol=2.0 ** -10, atol=1e-5)
    assert float(x.std(0).mean()) > 1e-3  # a family that differs, not zeros
    m_full, m_kept = (json.loads((d / "family.json").read_text()) for d in (full, kept))
    assert m_full["spread_calibration"]["factors"] == m_kept["spread_calibration"]["factors"]
    assert m_kept["n_samples"] == 4 and m_kept["samples_stored"] == 2
    assert m_kept["consistency"] == m_full["consistency"]


@pytest.mark.slow  # 16 samples of 24 x 64 x 64
def test_default_family_is_at_most_9_tomogram_sizes_on_disk(tmp_path):
    """16 float16 samples (zstd), float32 mean, float16 std: at most 9 float32 copies
    of the tomogram (sizes of the files, as ``du --apparent-size``; file system blocks
    depend on the file system, not on the family), against 18 for 16 float32 samples,
    mean and std."""
    shape = (24, 64, 64)
    r, tomo = stochastic_restorer(), _tomo(tmp_path, shape)
    fam = sample_file(r, tomo, tmp_path / "fam", _settings(16, tile=32, overlap=8), PLAIN)
    ratio = _size(fam) / (int(np.prod(shape)) * 4)
    print(f"family / float32 input: {ratio:.2f}")
    # 16 half-size samples, compressed by no more than the codec can: the samples are
    # all there
    assert 7.0 < ratio <= 9.0


@pytest.mark.slow  # 3-9 s on one worker
def test_napari_reader_opens_a_float16_family(tmp_path):
    from cryowae.plugins._reader import read_family_dir

    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    fam = sample_file(r, tomo, tmp_path / "fam", _settings(3), PLAIN)
    layers = {kw["metadata"]["cryowae"]["kind"]: (data, kw) for data, kw, _ in
              read_family_dir(fam)}
    samples, kw = layers["samples"]
    assert samples.shape == (3, 24, 40, 36) and samples.dtype == np.float16
    assert not kw["multiscale"] and np.all(np.isfinite(kw["contrast_limits"]))
    std, kw = layers["std"]
    assert std.dtype == np.float16 and kw["contrast_limits"][1] > kw["contrast_limits"][0]


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_viewer_shows_a_float16_family_with_the_sample_slider(viewer, tmp_path):  # noqa: F811
    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    fam = sample_file(r, tomo, tmp_path / "fam", _settings(3), PLAIN)
    layers = viewer.open(str(fam), plugin="cryowae")
    assert [ly.name for ly in layers] == ["fam samples", "fam mean", "fam std"]
    assert viewer.dims.ndim == 4 and viewer.dims.nsteps[0] == 3  # slider over S
    layers[0].visible = True
    viewer.dims.set_current_step(0, 2)
    viewer.dims.set_current_step(1, 10)
    assert _rendered(viewer.screenshot(canvas_only=True))


class _Stop(Exception):
    pass


@pytest.mark.slow  # 3-9 s on one worker
def test_resume_after_stopping_while_copying_the_samples(tmp_path, monkeypatch):
    """Stopped after the first float16 sample is copied and recorded (its float32
    working chunks not yet removed): the rerun copies the rest and gives the
    uninterrupted family."""
    from cryowae.sampling.family_state import FamilyRun

    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    kw = dict(sampling=_settings(3), calibration=PLAIN, storage=StorageSettings(keep=2))
    whole = sample_file(r, tomo, tmp_path / "whole", **kw)
    save = FamilyRun.save

    def stop_after_one_copy(self):
        save(self)
        if self.output.get("exported") == [0]:
            raise _Stop

    monkeypatch.setattr(FamilyRun, "save", stop_after_one_copy)
    with pytest.raises(_Stop):
        sample_file(r, tomo, tmp_path / "resumed", **kw)
    monkeypatch.setattr(FamilyRun, "save", save)
    work = tmp_path / ".resumed.partial" / "work.zarr"
    assert list(work.glob("1.*"))  # sample 1 not yet copied
    out = sample_file(r, tomo, tmp_path / "resumed", **kw)
    a, b = (np.asarray(read_ome_zarr(d / "samples.zarr").data) for d in (whole, out))
    assert b.shape[0] == 2
    np.testing.assert_array_equal(a, b)
    for name in ("mean.mrc", "std.mrc"):
        np.testing.assert_array_equal(read_mrc(whole / name).numpy(),
                                      read_mrc(out / name).numpy())
    assert sorted(p.name for p in out.iterdir()) == ["family.json", "mean.mrc",
                                                     "samples.zarr", "std.mrc"]
