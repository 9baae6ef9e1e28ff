"""Spread recalibration (cryowae/sampling/recalibrate.py): on a linear-Gaussian family
with a known under-dispersion the estimated factors recover it and the recalibrated
family has spread/skill about 1; the in-place store pass resumes exactly; sample_file
and the CLI record and validate the option."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import zarr

from cryowae.io import read_mrc, read_ome_zarr, write_mrc
from cryowae.metrics.calibration import spread_skill
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling import sample_file
from cryowae.sampling.recalibrate import (
    estimate_factors,
    factors_from_truth,
    recalibrate_family,
)
from cryowae.sampling.settings import CalibrationSettings, StorageSettings
from cryowae.sampling.store_calibration import calibrate_store

from .test_sampling import _settings, _tomogram, stochastic_restorer

GEO = TiltGeometry(-60.0, 60.0, "y", "model")
SHAPE = (32, 32, 32)
#: the family's spread is C times the posterior's
C = 0.4


def _field(power: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A real Gaussian field with `power` per rfft coefficient (ortho)."""
    white = torch.fft.rfftn(torch.randn(SHAPE, generator=gen), norm="ortho")
    return torch.fft.irfftn(white * power.sqrt(), s=SHAPE, norm="ortho")


def gaussian_case(n_samples: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Truth t (power P), halves M(t + n) with noise power 8 |k| per half (the ramp of
    weighted back-projection), the full tomogram their mean (noise power N = 4 |k|), and
    S draws of the exact posterior with the spread scaled by C: measured mean W d,
    variance W N (W = P / (P + N)); wedge mean 0, variance P."""
    gen = torch.Generator().manual_seed(seed)
    k = radial_frequency(SHAPE, rfft=True)
    p = 6.0 / (1.0 + (k / 0.08) ** 4)
    meas = GEO.wedge_mask(SHAPE, rfft=True) > 0.5
    t = _field(p, gen)

    def measured(v: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(torch.fft.rfftn(v) * meas, s=SHAPE)

    noise = 4.0 * k
    even = measured(t + _field(2 * noise, gen))
    odd = measured(t + _field(2 * noise, gen))
    data = 0.5 * (even + odd)
    w = p / (p + noise)
    fd = torch.fft.rfftn(data, norm="ortho")
    mean = torch.where(meas, w * fd, torch.zeros_like(fd))
    sd = torch.where(meas, (w * noise).sqrt(), p.sqrt())
    samples = torch.stack([torch.fft.irfftn(
        mean + C * sd * torch.fft.rfftn(torch.randn(SHAPE, generator=gen), norm="ortho"),
        s=SHAPE, norm="ortho") for _ in range(n_samples)])
    return {"truth": t, "data": data, "even": even, "odd": odd, "samples": samples}


@pytest.mark.parametrize("mode", ["halves", "data"])
def test_estimated_factors_recover_a_known_underdispersion(mode):
    c = gaussian_case()
    before = spread_skill(c["samples"], c["truth"], GEO)
    assert before.ratio_measured == pytest.approx(C, rel=0.15)
    assert before.ratio_wedge == pytest.approx(C, rel=0.15)
    factors, info = estimate_factors(c["samples"], c["data"], GEO, mode,
                                     c["even"], c["odd"])
    # spread/skill 1 needs (S + 1) / S a^2 C^2 sigma^2 = sigma^2 (1 + C^2 / S), the
    # family mean's error (sigma^2 the posterior variance)
    s = c["samples"].shape[0]
    want = np.sqrt(s / (s + 1) * (1 + C**2 / s)) / C
    mid = (factors.frequency > 0.05) & (factors.frequency < 0.3)
    assert np.median(factors.measured[mid]) == pytest.approx(want, rel=0.1)
    # the wedge's factors are the measured region's, raised only where the wedge would
    # otherwise keep less spread per coefficient than the measured region (the floor)
    raised = factors.wedge != factors.measured
    assert np.all(factors.wedge >= factors.measured)
    assert raised.sum() == info["wedge_floor_shells"] <= 8  # 6 of 27 measured (margin)
    assert info["tail_from_shell"] == factors.frequency.size  # the Wiener error: not pooled
    plain, _ = estimate_factors(c["samples"], c["data"], GEO, mode, c["even"], c["odd"],
                                wedge_floor=False)
    np.testing.assert_array_equal(plain.measured, plain.wedge)
    assert info["crop"] == [[0, 32]] * 3
    after = spread_skill(recalibrate_family(c["samples"], factors, GEO), c["truth"], GEO)
    assert after.ratio_measured == pytest.approx(1.0, abs=0.15)
    assert after.ratio_wedge == pytest.approx(1.0, abs=0.15)


def test_oracle_factors_calibrate_each_region_and_keep_the_mean():
    c = gaussian_case()
    rec = recalibrate_family(c["samples"], factors_from_truth(c["samples"], c["truth"], GEO),
                             GEO)
    ss = spread_skill(rec, c["truth"], GEO)
    assert ss.ratio_measured == pytest.approx(1.0, abs=0.02)
    assert ss.ratio_wedge == pytest.approx(1.0, abs=0.02)
    torch.testing.assert_close(rec.mean(0), c["samples"].mean(0), atol=1e-5, rtol=0)


class _Stop(Exception):
    pass


def _store(tmp_path, samples: torch.Tensor, name: str):
    z = zarr.open_array(str(tmp_path / name), mode="w", shape=tuple(samples.shape),
                        chunks=(1, 16, 16, 16), dtype="f4")
    z[:] = samples.numpy()
    return z


# stopped after sample 0 is rewritten / sample 1 filtered / the last save
@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [4, 5, 10])
def test_calibrate_store_in_place_resumes_exactly(tmp_path, stop_at):
    c = gaussian_case(n_samples=4)
    whole = _store(tmp_path, c["samples"], "whole.zarr")
    (tmp_path / "w1").mkdir()
    rec = calibrate_store(whole, c["data"].numpy(), GEO, "auto", {}, lambda: None,
                          tmp_path / "w1", c["even"].numpy(), c["odd"].numpy(), tile=16,
                          overlap=8)
    assert rec["mode"] == "halves" and rec["factors"]["source"].startswith("halves")
    assert list((tmp_path / "w1").iterdir()) == []  # its work files are gone
    done = np.asarray(whole[:])
    np.testing.assert_allclose(done.mean(0), c["samples"].numpy().mean(0), atol=1e-5)
    ss = spread_skill(torch.from_numpy(done), c["truth"], GEO)
    assert ss.ratio_measured == pytest.approx(1.0, abs=0.2)
    assert ss.ratio_wedge == pytest.approx(1.0, abs=0.2)

    part = _store(tmp_path, c["samples"], "part.zarr")
    (tmp_path / "w2").mkdir()
    state: dict = {}
    saved: list[dict] = []

    def save() -> None:
        saved.append(copy.deepcopy(state))
        if len(saved) == stop_at:
            raise _Stop

    with pytest.raises(_Stop):
        calibrate_store(part, c["data"].numpy(), GEO, "auto", state, save, tmp_path / "w2",
                        c["even"].numpy(), c["odd"].numpy(), tile=16, overlap=8)
    state = saved[-1]
    calibrate_store(part, c["data"].numpy(), GEO, "auto", state, lambda: None,
                    tmp_path / "w2", c["even"].numpy(), c["odd"].numpy(), tile=16, overlap=8)
    np.testing.assert_array_equal(np.asarray(part[:]), done)


@pytest.mark.slow  # 6.3 s: two families, SURE and the wedge ratio
def test_sample_file_records_the_calibration_and_centres_on_the_restoration(tmp_path):
    """A calibrated family is centred on the mean path's restoration (what `cryowae
    restore` writes), its deviations filtered from the raw family's (the local step,
    tested in test_local_spread.py and test_sample_local.py, off)."""
    from cryowae.inference.restore import restore_array
    from cryowae.sampling.local_spread import LocalSpreadSettings
    from cryowae.sampling.recalibrate import ShellFactors, recalibrate_sample

    r = stochastic_restorer()
    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, _tomogram(), voxel_size=10.0)
    # float32 samples and std: the figures below compare the stored family exactly
    kw = dict(sampling=_settings(3), storage=StorageSettings(sample_dtype="float32",
                                                             std_dtype="float32"),
              local=LocalSpreadSettings(enabled=False))
    raw = sample_file(r, tomo, tmp_path / "raw", calibration=CalibrationSettings("none"),
                      **kw)
    cal = sample_file(r, tomo, tmp_path / "cal", **kw)
    m_raw, m_cal = (json.loads((d / "family.json").read_text()) for d in (raw, cal))
    # the centre's restoration is a working file: the output holds the family only
    assert sorted(p.name for p in cal.iterdir()) == ["family.json", "mean.mrc",
                                                     "samples.zarr", "std.mrc"]
    assert m_raw["spread_calibration"] == {"mode": "none"}
    assert m_raw["parameters"]["spread_calibration"] == "none"
    info = m_cal["spread_calibration"]
    assert info["mode"] == "data" and len(info["factors"]["measured"]) > 5
    assert info["centre"] == "restoration" and info["estimate"]["wedge_ratio"]["patches"] > 0
    assert info["factors"]["source"].startswith("data: SURE of the restoration")
    assert len(info["estimate"]["sure"]["error"]) == len(info["factors"]["measured"])
    a = np.asarray(read_ome_zarr(raw / "samples.zarr").data)
    b = np.asarray(read_ome_zarr(cal / "samples.zarr").data)
    restored = restore_array(r, _tomogram(), tile=16, overlap=8)
    np.testing.assert_allclose(b.mean(0), restored, atol=1e-4)
    assert np.abs(a.mean(0) - restored).max() > 1e-3  # the raw family's mean is not it
    fmap = ShellFactors.from_dict(info["factors"]).coefficient_map(a.shape[1:], GEO)
    # deviations: the raw ones, filtered (tiles with reflected borders here against one
    # whole-volume FFT there: alike, not equal)
    want = recalibrate_sample(a[0], a.mean(0), fmap).numpy() - a.mean(0)
    print("deviation correlation", np.corrcoef((b[0] - restored).ravel(), want.ravel())[0, 1])
    assert np.corrcoef((b[0] - restored).ravel(), want.ravel())[0, 1] > 0.8
    np.testing.assert_allclose(read_mrc(cal / "std.mrc").numpy(), b.std(0), atol=1e-4)


def test_wedge_ratio_is_reproducible_and_bounded():
    """gamma(k) from self-supervised patches of the halves (or of the tomogram alone):
    the same seed gives the same figures; values in [0, MAX_GAMMA]; a volume too small
    for a rotated patch of the model's multiple (4) uses no patch and gives 1."""
    from cryowae.sampling.wedge_ratio import MAX_GAMMA, wedge_ratio

    c = gaussian_case()
    m = stochastic_restorer().stochastic
    args = (m, c["data"].numpy(), c["even"].numpy(), c["odd"].numpy(), GEO)
    w1 = wedge_ratio(*args, patch=16, n_patches=8, n_samples=4, seed=3)
    w2 = wedge_ratio(*args, patch=16, n_patches=8, n_samples=4, seed=3)
    assert w1.patches == 8
    np.testing.assert_array_equal(w1.gamma, w2.gamma)
    assert np.all((w1.gamma >= 0) & (w1.gamma <= MAX_GAMMA))
    assert np.any(w1.gamma != 1.0)  # measured, not the fallback
    assert np.all(np.isfinite(w1.a_measured[1:3])) and np.all(w1.a_measured[1:3] > 0)
    # without the halves: the tomogram is input and target, SURE in the measured region
    w4 = wedge_ratio(m, c["data"].numpy(), None, None, GEO, patch=16, n_patches=8,
                     n_samples=4, seed=3)
    assert w4.patches == 8 and np.all((w4.gamma >= 0) & (w4.gamma <= MAX_GAMMA))
    assert np.any(w4.gamma != 1.0) and np.any(w4.gamma != w1.gamma)
    small = [v[:8, :8, :8] for v in (c["data"], c["even"], c["odd"])]
    w3 = wedge_ratio(m, *(v.numpy() for v in small), GEO, patch=16, n_patches=4,
                     n_samples=2)
    assert w3.patches == 0 and np.all(w3.gamma == 1.0)


@pytest.mark.slow  # 2.5 s: the wedge ratio on 64 patches
def test_halves_calibration_applies_the_wedge_ratio(tmp_path):
    """With the halves and the model, the wedge factors are the measured-region
    estimate times gamma(k), recorded in the estimate."""
    from cryowae.sampling.recalibrate import estimate_factors
    from cryowae.sampling.wedge_ratio import WedgeRatio

    c = gaussian_case()
    m = stochastic_restorer().stochastic
    z = _store(tmp_path, c["samples"], "s.zarr")
    args = (z, c["data"].numpy(), GEO, "halves", c["even"].numpy(), c["odd"].numpy())
    plain, _ = estimate_factors(*args)
    with_ratio, info = estimate_factors(*args, model=m)
    ratio = WedgeRatio(np.asarray(info["wedge_ratio"]["frequency"]),
                       np.asarray(info["wedge_ratio"]["gamma"]), np.zeros(1), np.zeros(1), 0)
    np.testing.assert_allclose(with_ratio.measured, plain.measured)
    np.testing.assert_allclose(with_ratio.wedge, plain.wedge * ratio.at(plain.frequency))
    assert info["wedge_ratio"]["patches"] > 0


@pytest.mark.slow  # 2.7 s: a calibrated family with halves
def test_sample_file_with_halves_uses_the_wedge_ratio(tmp_path):
    """`cryowae sample --even --odd` (auto): the halves' calibration with gamma(k) from
    the tomogram's own halves, recorded in family.json, and the restoration as centre."""
    from cryowae.sampling.wedge_ratio import WedgeRatio

    r = stochastic_restorer()
    paths = {}
    for name, seed in (("tomo", 0), ("even", 10), ("odd", 20)):
        paths[name] = tmp_path / f"{name}.mrc"
        write_mrc(paths[name], _tomogram(seed=0) + 0.2 * np.random.default_rng(seed).normal(
            size=(24, 40, 36)).astype(np.float32), voxel_size=10.0)
    fam = sample_file(r, paths["tomo"], tmp_path / "fam", _settings(3), even=paths["even"],
                      odd=paths["odd"])
    info = json.loads((fam / "family.json").read_text())["spread_calibration"]
    assert info["mode"] == "halves" and info["centre"] == "restoration"
    wr = info["estimate"]["wedge_ratio"]
    assert wr["patches"] > 0
    ratio = WedgeRatio(np.asarray(wr["frequency"]), np.asarray(wr["gamma"]), np.zeros(1),
                       np.zeros(1), wr["patches"])
    f = info["factors"]
    np.testing.assert_allclose(f["wedge"], np.asarray(f["measured"])
                               * ratio.at(np.asarray(f["frequency"])), rtol=1e-6)


def test_pooled_tail_replaces_noisy_shells_and_reaches_the_corners():
    """From the first shell past the transfer's peak where the restoration passes less
    than 2 % of the data, every shell's error is the median error / spread ratio times
    its spread (one factor for all); below, nothing changes; the box's corners beyond
    Nyquist take the pooled factor, not the last shell's outlier (whose transfer, read
    against a noise estimate too low at Nyquist, looks high again)."""
    from cryowae.errors import CryowaeInputError
    from cryowae.metrics.spectral import shell_frequencies
    from cryowae.sampling.recalibrate import (
        TAIL_TRANSFER,
        ShellFactors,
        factors_from_data,
        pooled_tail,
    )

    freq = shell_frequencies(SHAPE)  # 17 shells
    spread = np.geomspace(1.0, 1e-3, freq.size)
    ratio = np.full(freq.size, 4.0)
    ratio[11:] = [1.0, 9.0, -2.0, 6.0, 2.0, 121.0]  # noisy, negative, an outlier at Nyquist
    error = ratio * spread
    transfer = np.r_[np.nan, np.linspace(0.6, 0.1, 9), 0.05, 0.01, 0.03, 0.01, 0.005,
                     0.0, 0.04]
    pooled, start = pooled_tail(error, spread, transfer)
    assert TAIL_TRANSFER == 0.02
    assert start == 11  # the first shell past the peak below 2 %
    np.testing.assert_array_equal(pooled[:11], error[:11])
    np.testing.assert_allclose(pooled[11:], 4.0 * spread[11:])  # median of 1 9 -2 6 2 121
    factors = factors_from_data(spread, pooled, freq, "test")
    np.testing.assert_allclose(factors.measured[11:], 2.0)
    fmap = ShellFactors(freq, factors.measured, factors.wedge).coefficient_map(SHAPE, GEO)
    assert float(fmap[16, 16, 16]) == pytest.approx(2.0)  # |k| = 0.87: a corner
    # a restoration that passes data up to Nyquist leaves the estimate as it is
    same, start = pooled_tail(error, spread, np.full(freq.size, 0.5))
    np.testing.assert_array_equal(same, error)
    assert start == freq.size
    with pytest.raises(CryowaeInputError, match="transfer"):
        pooled_tail(error, spread, transfer[:-1])


def test_sure_calibration_pools_the_tail_of_a_known_posterior():
    """The exact posterior spread by C and its mean's own filter as the restoration
    (SURE, as `cryowae sample` runs it): the shells where the filter passes less than
    2 % (near 0.3 cycles/voxel) share one factor, recorded in the estimate, and the
    recalibrated family's spread/skill is 1 in each region."""
    c = gaussian_case()
    k = radial_frequency(SHAPE, rfft=True)
    p, noise = 6.0 / (1.0 + (k / 0.08) ** 4), 4.0 * k
    w = torch.where(GEO.wedge_mask(SHAPE, rfft=True) > 0.5, p / (p + noise), 0.0)

    def restore(x: np.ndarray) -> np.ndarray:
        return torch.fft.irfftn(torch.fft.rfftn(torch.as_tensor(x)) * w, s=SHAPE).numpy()

    factors, info = estimate_factors(c["samples"], c["data"], GEO, "data",
                                     wedge_floor=False, restore=restore)
    tail = info["tail_from_shell"]
    assert 0.2 < factors.frequency[tail] < 0.4
    assert "tail from" in factors.source
    assert np.all(factors.measured[tail:] == factors.measured[-1])
    assert len(set(factors.measured[1:tail].tolist())) > 3  # below the tail: per shell
    after = spread_skill(recalibrate_family(c["samples"], factors, GEO), c["truth"], GEO)
    assert after.ratio_measured == pytest.approx(1.0, abs=0.15)
    assert after.ratio_wedge == pytest.approx(1.0, abs=0.15)
