"""The simulator's named acquisition/reconstruction pipelines, each on a known answer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io import read_mrc
from cryowae.metrics.calibration import SpectralGrid
from cryowae.metrics.calibration_checks import truth_seen_by_data
from cryowae.physics.ctf import CTFParams
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import wedge_mask
from cryowae.simulation import SimulationConfig, simulate_tomogram, write_simulation
from cryowae.simulation.pipelines import (
    PIPELINES,
    InsertionSettings,
    PipelineSettings,
    get_pipeline,
)
from cryowae.simulation.projection import _padded_length, weighted_backprojection
from cryowae.simulation.reconstruct import (
    bin2,
    critical_exposure,
    exposure_filter,
    exposures,
    fourier_insertion,
    wbp_filter,
)

from .conftest import invoke_cli

SMALL = dict(size=32, thickness=24, voxel_size=10.0, seed=4)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float(a @ b / (a.norm() * b.norm()))


def measured_fcc(a: torch.Tensor, b: torch.Tensor, shape, axis: str = "y") -> float:
    """Correlation of the rfft coefficients of a and b over the measured region (no DC)."""
    m = wedge_mask(shape, -60, 60, axis, rfft=True) > 0.5
    m[0, 0, 0] = False
    fa, fb = torch.fft.rfftn(a.double())[m], torch.fft.rfftn(b.double())[m]
    return float((fa * fb.conj()).sum().real / (fa.abs().pow(2).sum().sqrt()
                                                * fb.abs().pow(2).sum().sqrt()))


def noise_power(volume: torch.Tensor) -> np.ndarray:
    """Mean power per coefficient per shell over the measured region (+-60 about Y)."""
    sg = SpectralGrid.of(volume.shape, TiltGeometry(-60, 60, "y", "test"))
    p = torch.fft.rfftn(volume.double(), norm="ortho").abs() ** 2
    return sg.shell_sums(p, sg.measured) / np.maximum(
        sg.shell_sums(torch.ones_like(p), sg.measured), 1)


# ------------------------------------------------------------------ registry


def test_registry_names_and_validation():
    assert get_pipeline("wbp").is_default
    assert [n for n, p in PIPELINES.items() if p.is_default] == ["wbp"]
    for name, p in PIPELINES.items():
        assert p.name == name and p.summary
        json.dumps(p.to_dict())
    with pytest.raises(CryowaeInputError, match="unknown pipeline 'nope'.*fourier"):
        get_pipeline("nope")
    with pytest.raises(CryowaeInputError, match="reconstruction"):
        PipelineSettings("x", "x", reconstruction="art")
    with pytest.raises(CryowaeInputError, match="WBP filter"):
        PipelineSettings("x", "x", reconstruction="fourier", wbp_filter="hamming")
    with pytest.raises(CryowaeInputError, match="weight floor"):
        InsertionSettings(weight_floor=0.0)
    with pytest.raises(AttributeError):
        get_pipeline("fourier").halves = "frames"  # type: ignore[misc]


def test_reconstruction_only_pipelines_share_scene_and_tilt_series():
    cfg = SimulationConfig(size=24, thickness=16, voxel_size=10.0, seed=4)
    ref = simulate_tomogram(cfg)
    assert all(torch.equal(ref[k], v) for k, v in
               simulate_tomogram(cfg, pipeline=get_pipeline("wbp")).items())
    for name in ("fourier", "wbp-rawctf"):
        res = simulate_tomogram(cfg, pipeline=get_pipeline(name))
        assert torch.equal(res["gt"], ref["gt"]) and torch.equal(
            res["tilt_series"], ref["tilt_series"]), name
        assert not torch.equal(res["tomo"], ref["tomo"]), name


# ------------------------------------------------------------------ noise spectra

ANGLES = torch.arange(-60.0, 60.01, 5.0)
NOISE_SHAPE = (32, 48, 48)


@pytest.fixture(scope="module")
def white_projections() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(len(ANGLES), NOISE_SHAPE[1], NOISE_SHAPE[2], generator=g)


def test_noise_spectrum_shape_per_reconstruction(white_projections):
    """White projection noise: WBP's power per shell grows like the ramp |k| (0.25 ->
    0.45 cycles/voxel: x1.8); Fourier insertion divided by the sampling weights is flat
    where the slices no longer overlap (above 1 / (step * pad * 48) = 0.12 cycles/voxel),
    and rises below it, where overlapping slices are averaged."""
    wbp = noise_power(weighted_backprojection(white_projections, ANGLES, NOISE_SHAPE))
    fi = noise_power(fourier_insertion(white_projections, ANGLES, NOISE_SHAPE))
    lo, hi = round(0.25 * 48), round(0.45 * 48)
    assert 1.5 < wbp[hi] / wbp[lo] < 2.3
    assert 0.7 < fi[hi] / fi[lo] < 1.15
    assert fi[lo] / fi[round(0.08 * 48)] > 1.5


@pytest.mark.parametrize("kind", ["hamming", "cosine", "sirt"])
def test_wbp_apodization_is_the_ramp_filtered_in_3d(kind, white_projections):
    """By the central-slice theorem, a detector-line filter a(k) on WBP about Y equals
    the ramp reconstruction filtered by a(sqrt(kz^2 + kx^2)) in 3D; the noise power of
    the apodized ones falls near Nyquist, the ramp's does not."""
    ramp = weighted_backprojection(white_projections, ANGLES, NOISE_SHAPE)
    apod = weighted_backprojection(white_projections, ANGLES, NOISE_SHAPE,
                                   radial=wbp_filter(kind, 10))
    z, y, x = NOISE_SHAPE
    kz = torch.fft.fftfreq(z, dtype=torch.float64)[:, None, None]
    kx = torch.fft.rfftfreq(x, dtype=torch.float64)[None, None, :]
    k = torch.sqrt(kz**2 + kx**2).expand(z, y, x // 2 + 1)
    n = _padded_length((z, x), x)  # the back-projector's line (SIRT's alpha = 1 / n)
    factor = wbp_filter(kind, 10)(k.flatten(), n).reshape(k.shape)
    expect = torch.fft.irfftn(torch.fft.rfftn(ramp.double()) * factor, s=NOISE_SHAPE)
    assert corr(apod, expect) > 0.97
    p_ramp, p_apod = noise_power(ramp), noise_power(apod)
    top = round(0.45 * 48)
    assert p_apod[top] / p_ramp[top] < 0.3
    assert p_apod[2] / p_ramp[2] > 0.85


def test_sirt_like_filter_formula():
    fn = wbp_filter("sirt", 1)
    k = torch.tensor([0.0, 0.01, 0.02, 0.1, 0.5], dtype=torch.float64)
    # N = 1: 1 - (1 - alpha / k) = alpha / k above alpha = 1 / n, 1 at and below it
    assert torch.allclose(fn(k, 100), torch.tensor([1.0, 1.0, 0.5, 0.1, 0.02],
                                                   dtype=torch.float64))
    fn20 = wbp_filter("sirt", 20)
    assert float(fn20(torch.tensor([0.5], dtype=torch.float64), 100)) == pytest.approx(
        1 - (1 - 0.02) ** 20)
    assert wbp_filter("ramp") is None


# ------------------------------------------------------------------ signal


@pytest.mark.parametrize("name", list(PIPELINES))
def test_noise_free_reconstruction_matches_the_truth_where_measured(name):
    """No noise, no CTF: every pipeline's tomogram equals the ground truth (on the
    target grid) in the measured region up to its filter: Fourier correlation > 0.95."""
    cfg = SimulationConfig(**SMALL, noise=False, ctf=False)
    res = simulate_tomogram(cfg, pipeline=get_pipeline(name))
    assert res["gt"].shape == res["tomo"].shape == cfg.shape
    assert measured_fcc(res["tomo"], res["gt"], cfg.shape) > 0.95


@pytest.mark.parametrize("name", ["fourier", "wbp-bin2-mean", "sirt-like"])
def test_tilt_axis_x(name):
    """About X the pipelines measure the X wedge: the tomogram matches the truth there
    and holds almost none of the truth's power in the X wedge's missing region, much of
    it in the Y wedge's."""
    cfg = SimulationConfig(**SMALL, noise=False, ctf=False, tilt_axis="x")
    res = simulate_tomogram(cfg, pipeline=get_pipeline(name))
    assert measured_fcc(res["tomo"], res["gt"], cfg.shape, "x") > 0.95
    ft, fg = (torch.fft.rfftn(v.double()).abs() ** 2 for v in (res["tomo"], res["gt"]))
    kept = {}
    for axis in ("x", "y"):
        missing = (wedge_mask(cfg.shape, -60, 60, axis, rfft=True) < 0.5)
        kept[axis] = float(ft[missing].sum() / fg[missing].sum())
    # Fourier insertion fills the wedge's edge (trilinear gridding): 14% against 2% for WBP
    assert kept["x"] < 0.2 and kept["y"] > 2.5 * kept["x"], kept


def test_phase_flip_and_raw_ctf():
    """With the CTF, the phase-flipped tomogram matches the truth filtered by |CTF|
    better than the raw one, whose transfer changes sign past the first zero."""
    cfg = SimulationConfig(**SMALL, noise=False)
    seen = torch.as_tensor(truth_seen_by_data(simulate_tomogram(cfg)["gt"], 10.0, CTFParams()))
    flip = measured_fcc(simulate_tomogram(cfg)["tomo"], seen, cfg.shape)
    raw = measured_fcc(simulate_tomogram(cfg, pipeline=get_pipeline("wbp-rawctf"))["tomo"],
                       seen, cfg.shape)
    assert flip > 0.95 and raw < flip - 0.02


def test_halves_by_frames_share_signal_with_independent_noise():
    """Frame halves image the same tilts: without noise they are equal; with noise each
    half carries twice the full tomogram's noise variance, independent of the other."""
    p = get_pipeline("wbp-frames")
    clean = simulate_tomogram(SimulationConfig(**SMALL, noise=False), pipeline=p)
    assert torch.equal(clean["tomo_even"], clean["tomo_odd"])
    noisy = simulate_tomogram(SimulationConfig(**SMALL), pipeline=p)
    ne, no = noisy["tomo_even"] - clean["tomo"], noisy["tomo_odd"] - clean["tomo"]
    nf = noisy["tomo"] - clean["tomo"]
    assert abs(corr(ne, no)) < 0.05
    assert float(ne.var() / no.var()) == pytest.approx(1.0, abs=0.1)
    assert float(ne.var() / nf.var()) == pytest.approx(2.0, rel=0.1)
    assert torch.allclose(noisy["tomo"], 0.5 * (noisy["tomo_even"] + noisy["tomo_odd"]))


@pytest.mark.parametrize("name", ["wbp-bin2-mean", "wbp-bin2-fourier"])
def test_binned_pipeline_writes_the_target_grid(name, tmp_path):
    cfg = SimulationConfig(**SMALL)
    out = write_simulation(tmp_path / "sim", cfg, pipeline=get_pipeline(name))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pipeline"]["name"] == name and meta["pipeline"]["binning"] in name
    assert meta["voxel_size_A"] == 10.0 and meta["shape_zyx"] == list(cfg.shape)
    for f in ("tomo", "tomo_even", "tomo_odd", "gt"):
        vol = read_mrc(out / f"{f}.mrc")
        assert vol.data.shape == cfg.shape and vol.voxel_size == pytest.approx(10.0)
    assert read_mrc(out / "tilt_series.mrc").data.shape == (41, 32, 32)


def test_bin2_known_answers():
    a = torch.arange(16.0).reshape(4, 4)
    assert torch.equal(bin2(a, "mean", 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    # a cosine below the binned Nyquist is kept exactly by Fourier cropping
    x = torch.arange(32.0)
    wave = 3.0 + torch.cos(2 * math.pi * 3 * x / 32)[None, :].expand(8, 32)
    got = bin2(wave, "fourier", 2)
    assert torch.allclose(got, wave[::2, ::2], atol=1e-5)
    vol = torch.randn(8, 8, 8, generator=torch.Generator().manual_seed(1))
    assert float(bin2(vol, "fourier", 3).mean()) == pytest.approx(float(vol.mean()), abs=1e-6)
    assert float(bin2(vol, "mean", 3).mean()) == pytest.approx(float(vol.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="odd"):
        bin2(torch.zeros(5, 4), "mean", 2)


# ------------------------------------------------------------------ dose


def test_dose_symmetric_exposures_and_critical_exposure():
    e = exposures(torch.tensor([-6.0, -3.0, 0.0, 3.0, 6.0]), 2.0)
    assert e.tolist() == [8.0 + 1.0, 4.0 + 1.0, 1.0, 2.0 + 1.0, 6.0 + 1.0]
    # Grant & Grigorieff 2015 at 300 kV: N_e(1/10 A) = 0.245 * 10^1.665 + 2.81
    assert float(critical_exposure(torch.tensor(0.1))) == pytest.approx(
        0.245 * 10**1.665 + 2.81, rel=1e-5)
    assert float(critical_exposure(torch.tensor(0.1), 200.0)) == pytest.approx(
        0.8 * (0.245 * 10**1.665 + 2.81), rel=1e-5)


def test_exposure_filter_attenuates_high_frequencies_of_late_tilts():
    """Each tilt's amplitude spectrum is multiplied by exp(-N / (2 N_e(k))): the ratio
    of a late (N = 100) to an early (N = 1) tilt's power of the same image is
    exp(-99 / N_e(k)) at every k, ~1 at low k and tiny at Nyquist (1/20 A)."""
    g = torch.Generator().manual_seed(2)
    img = torch.randn(1, 64, 64, generator=g).expand(2, 64, 64)
    out = exposure_filter(img, 10.0, torch.tensor([1.0, 100.0]))
    f = torch.fft.rfft2(out).abs() ** 2
    k = torch.sqrt(torch.fft.fftfreq(64, 10.0)[:, None] ** 2
                   + torch.fft.rfftfreq(64, 10.0)[None, :] ** 2)
    for lo, hi in ((0.005, 0.01), (0.045, 0.05)):
        band = (k >= lo) & (k < hi)
        ratio = float(f[1][band].sum() / f[0][band].sum())
        kk = torch.tensor((lo + hi) / 2)
        assert ratio == pytest.approx(float(torch.exp(-99 / critical_exposure(kk))),
                                      rel=0.25, abs=0.01)
    assert float(f[1][k < 0.005].sum() / f[0][k < 0.005].sum()) > 0.7


def test_dose_weighted_pipeline_damps_late_tilts_in_the_series():
    cfg = SimulationConfig(**SMALL, noise=False, ctf=False)
    clean = simulate_tomogram(cfg)["tilt_series"]
    damaged = simulate_tomogram(cfg, pipeline=get_pipeline("wbp-damage"))["tilt_series"]
    hi = torch.fft.rfft2(clean).abs()[:, 8:24, 8:].pow(2).sum((-2, -1))
    hd = torch.fft.rfft2(damaged).abs()[:, 8:24, 8:].pow(2).sum((-2, -1))
    kept = hd / hi  # per tilt, high frequencies
    order = torch.argsort(exposures(torch.as_tensor(cfg.tilt_angles()), 120 / 41))
    assert float(kept[order[0]]) > 0.9 and float(kept[order[-1]]) < 0.4 * float(kept[order[0]])


# ------------------------------------------------------------------ CLI


def test_cli_pipeline_list_and_meta(tmp_path):
    proc = invoke_cli("simulate", tmp_path / "x", "--pipeline", "list")
    assert proc.returncode == 0 and not (tmp_path / "x").exists()
    assert all(name in proc.stdout for name in PIPELINES)
    proc = invoke_cli("simulate", tmp_path / "y", "--pipeline", "sirt")
    assert proc.returncode == 2 and "unknown pipeline 'sirt'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "y").exists()
    out = tmp_path / "sim"
    proc = invoke_cli("simulate", out, "--size", "32", "--voxel-size", "10",
                      "--pipeline", "fourier")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["pipeline"]["name"] == "fourier"
    assert meta["pipeline"]["reconstruction"] == "fourier"
    assert "fourier" in meta["files"]["tomo.mrc"]
