"""The local spread step and the self-check inside `cryowae sample` (issue 21, items 2
and 4): the self-check line is printed, the local step acts on all N float32 samples
before the moments and the export, ``--no-local-spread`` leaves the family as the
per-shell calibration made it, and a run stopped inside the local step resumes to the
uninterrupted family."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from cryowae.inference.restore import restore_array
from cryowae.io import read_mrc, read_ome_zarr, write_mrc
from cryowae.io.stats import volume_stats
from cryowae.sampling import sample_file
from cryowae.sampling.local_spread import LocalSpreadSettings
from cryowae.sampling.selfcheck import self_check
from cryowae.sampling.settings import CalibrationSettings, StorageSettings
from cryowae.sampling.store_local_spread import localise_store

from .conftest import invoke_cli
from .test_sampling import GEO, _settings, _tomogram, stochastic_restorer

#: no per-shell calibration, no consistency check: what these tests measure is the
#: local step and the self-check
PLAIN = CalibrationSettings("none", "none")
#: float32, every sample kept: the stored samples are the working ones
EXACT = StorageSettings(sample_dtype="float32")
OFF = LocalSpreadSettings(enabled=False)


def _tomo(tmp_path, shape=(24, 40, 36)):
    path = tmp_path / "tomo.mrc"
    write_mrc(path, _tomogram(shape) - 7.0, voxel_size=10.0)
    return path


def _family(out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    samples = np.asarray(read_ome_zarr(out / "samples.zarr").data, np.float32)
    return samples, read_mrc(out / "mean.mrc").numpy(), read_mrc(out / "std.mrc").numpy()


@pytest.mark.slow(seconds=15)
def test_cli_sample_prints_the_self_check_line(tmp_path, small_sim):
    """`cryowae sample` on a small simulated tomogram prints the self-check line once
    (stdout when it agrees, stderr as a WARNING when not) and records it."""
    from cryowae.models.checkpoint import save_restorer
    from cryowae.training.config import TrainConfig

    r = stochastic_restorer()
    model = tmp_path / "model.pt"
    cfg = TrainConfig(patch_size=16, restorer=r.stochastic.mean.config)
    save_restorer(model, r.model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.zeros(0, 8), geometry=GEO, stochastic=r.stochastic)
    res = invoke_cli("sample", model, small_sim / "tomo.mrc", "--n", "3", "--tile", "16",
                     "--overlap", "8", "--out", tmp_path / "fam")
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "fam" / "family.json").read_text())
    line = meta["self_check"]["line"]
    both = res.stdout + res.stderr
    assert both.count("self-check (no ground truth)") == 1
    assert line in (res.stderr if line.startswith("WARNING") else res.stdout)
    assert meta["self_check"]["verdict"] in ("agrees", "disagrees")
    assert line.startswith("WARNING") == (meta["self_check"]["verdict"] == "disagrees")
    assert meta["local_spread"]["settings"]["enabled"] is True
    assert "local spread: gain" in res.stdout


@pytest.mark.slow(seconds=15)
def test_local_step_modulates_all_float32_samples_before_the_moments(tmp_path):
    """The family with the local step is ``localise_store`` applied to the family
    without it (which is the per-shell calibration's output), with the same
    restoration; mean.mrc and std.mrc are the moments of the modulated samples; the
    mean is unchanged and the std moves."""
    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    kw = dict(sampling=_settings(4), calibration=PLAIN, storage=EXACT)
    off = sample_file(r, tomo, tmp_path / "off", local=OFF, **kw)
    on = sample_file(r, tomo, tmp_path / "on", **kw)
    x_off, m_off, s_off = _family(off)
    x_on, m_on, s_on = _family(on)

    data = read_mrc(tomo).numpy()
    restore = functools.partial(restore_array, r, tile=16, overlap=8, batch_size=4,
                                norm=volume_stats(data))
    want = x_off.copy()
    work = tmp_path / "work"
    work.mkdir()
    localise_store(want, restore(data), GEO, {}, lambda: None, work)
    np.testing.assert_allclose(x_on, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))
    # moments of all N modulated float32 samples (std ddof 0, stored as float16)
    np.testing.assert_allclose(m_on, x_on.astype(np.float64).mean(0), atol=1e-5)
    np.testing.assert_allclose(s_on, x_on.astype(np.float64).std(0), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(m_on, m_off, atol=1e-5 * float(np.abs(m_off).max()))
    assert float(np.abs(s_on - s_off).max()) > 0.05 * float(s_off.mean())
    meta_on = json.loads((on / "family.json").read_text())
    meta_off = json.loads((off / "family.json").read_text())
    assert meta_off["local_spread"] == {"settings": OFF.describe()}
    g = meta_on["local_spread"]["gain"]
    # clipped to [1/8, 8], then normalised once more (the total variance): about the clip
    top = 1.1 * LocalSpreadSettings().max_gain
    assert 1 / top <= g["gain_min"] < 1 < g["gain_max"] <= top
    for meta in (meta_on, meta_off):
        assert meta["self_check"]["verdict"] in ("agrees", "disagrees")


@pytest.mark.slow(seconds=10)
def test_self_check_of_a_stored_family_scales_with_its_spread(tmp_path):
    """On the family `sample_file` wrote, the self-check's spread/skill of the family's
    deviations scaled by 2 and by 0.5 is exactly 2 and 0.5 x that of the family (the
    error estimates do not depend on the samples); scaled on, a family is flagged too
    wide in both regions, too narrow in the measured one (the wedge's figure is a lower
    bound: never "too narrow"), whatever the original."""
    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    out = sample_file(r, tomo, tmp_path / "fam", _settings(4), PLAIN, EXACT, OFF)
    x, _, _ = _family(out)
    data = read_mrc(tomo).numpy()
    restore = functools.partial(restore_array, r, tile=16, overlap=8, batch_size=4,
                                norm=volume_stats(data))
    meta = json.loads((out / "family.json").read_text())
    base = self_check(x, data, GEO, restore)
    assert base["spread_skill"] == pytest.approx(meta["self_check"]["spread_skill"],
                                                 rel=1e-5)
    m = x.mean(0)
    # scale up and down until each flagged (a few factors of 2 whatever the original)
    for factor, word in ((2.0, "too wide"), (0.5, "too narrow")):
        scale = factor
        while True:
            chk = self_check(m + scale * (x - m), data, GEO, restore)
            for region in ("measured", "wedge"):
                assert chk["spread_skill"][region] == pytest.approx(
                    scale * base["spread_skill"][region], rel=1e-4)
            regions = ("measured", "wedge") if word == "too wide" else ("measured",)
            if all(word in chk["regions"][k] for k in regions):
                assert "too narrow" not in chk["regions"]["wedge"]
                break
            scale *= factor
            assert 1 / 64 < scale < 64
        assert chk["verdict"] == "disagrees" and chk["line"].startswith("WARNING")
        assert word in chk["line"]


class _Stop(Exception):
    pass


@pytest.mark.slow(seconds=15)
def test_resume_inside_the_local_step_gives_the_uninterrupted_family(tmp_path, monkeypatch):
    """Stopped after the local step has modulated sample 1 but before it is copied back
    (float16 samples, K = 2 of N = 4: the step runs in the working store): the rerun
    gives the uninterrupted family bit for bit."""
    from cryowae.sampling.family_state import FamilyRun

    r, tomo = stochastic_restorer(), _tomo(tmp_path)
    kw = dict(sampling=_settings(4), calibration=PLAIN, storage=StorageSettings(keep=2))
    whole = sample_file(r, tomo, tmp_path / "whole", **kw)
    save = FamilyRun.save

    def stop_inside_the_local_step(self):
        save(self)
        if self.local.get("modulated") == 1 and self.local.get("done") == [0]:
            raise _Stop

    monkeypatch.setattr(FamilyRun, "save", stop_inside_the_local_step)
    with pytest.raises(_Stop):
        sample_file(r, tomo, tmp_path / "resumed", **kw)
    monkeypatch.setattr(FamilyRun, "save", save)
    assert (tmp_path / ".resumed.partial" / "local_sample.npy").is_file()
    out = sample_file(r, tomo, tmp_path / "resumed", **kw)
    for a, b in zip(_family(whole), _family(out), strict=True):
        np.testing.assert_array_equal(a, b)
    a, b = (json.loads((d / "family.json").read_text()) for d in (whole, out))
    assert a["local_spread"] == b["local_spread"] and a["self_check"] == b["self_check"]
    assert sorted(p.name for p in out.iterdir()) == ["family.json", "mean.mrc",
                                                     "samples.zarr", "std.mrc"]
