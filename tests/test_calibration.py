"""Calibration metrics of posterior families (metrics/calibration*.py) on synthetic
families whose calibration is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.calibration import (
    crps_ensemble,
    crps_report,
    family_spread,
    interval_coverage,
    spread_skill,
    wedge_component,
    wedge_coverage,
)
from cryowae.metrics.calibration_checks import (
    ctf_first_zero,
    ctf_params_from_meta,
    ctf_radial,
    halves_check,
    measured_residual_ratio,
    truth_seen_by_data,
)
from cryowae.physics.crop import central_box, central_crop, crop_of
from cryowae.physics.ctf import CTFParams, ctf_2d
from cryowae.physics.fourier import radial_frequency, shell_index
from cryowae.physics.geometry import TiltGeometry

DIMS = (-3, -2, -1)
SHAPE = (16, 16, 16)
GEO = TiltGeometry(-50.0, 50.0)


def _fourier(gen: torch.Generator, n: int, amp: torch.Tensor) -> torch.Tensor:
    """n complex Gaussian spectra (ortho rfft of white noise) times `amp`."""
    w = torch.randn((n, *SHAPE), generator=gen)
    return torch.fft.rfftn(w, dim=DIMS, norm="ortho") * amp


def _real(spec: torch.Tensor) -> torch.Tensor:
    return torch.fft.irfftn(spec, s=SHAPE, dim=DIMS, norm="ortho")


class _World:
    """Linear-Gaussian tomography per Fourier coefficient: signal power S(k); the data
    d = t + n (noise power N) measured in the tilt range only; the exact posterior is
    (W d, W N) with W = S / (S + N) where measured and the prior (0, S) in the wedge."""

    def __init__(self, seed: int, noise: float = 1.0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        r = radial_frequency(SHAPE, rfft=True)
        self.m = GEO.wedge_mask(SHAPE)
        self.s = 20.0 * torch.exp(-(r / 0.12) ** 2)
        self.n = torch.full_like(r, noise)
        self.t = _fourier(self.gen, 1, self.s.sqrt())[0]
        self.gain = self.s / (self.s + self.n)

    def data(self) -> torch.Tensor:
        return self.m * (self.t + _fourier(self.gen, 1, self.n.sqrt())[0])

    def family(self, d: torch.Tensor, size: int, scale: float = 1.0,
               carry_noise: bool = False) -> torch.Tensor:
        """Posterior draws given data d (rfft), their spread times `scale`; with
        `carry_noise` the measured region is the data itself (hard consistency)."""
        mean = self.m * self.gain * d
        std = self.m * (self.gain * self.n).sqrt() + (1 - self.m) * self.s.sqrt()
        draws = mean + scale * _fourier(self.gen, size, std)
        if carry_noise:
            draws = self.m * d + (1 - self.m) * draws
        return _real(draws)

    def noise_per_shell(self, factor: float = 1.0) -> np.ndarray:
        _, n = shell_index(SHAPE)
        return np.full(n, float(self.n[0, 0, 0]) * factor)


def _gaussian_family(seed: int, size: int, scale: float):
    """Truth and family drawn from one anisotropic Gaussian (wider in the wedge), the
    family's deviations scaled by `scale`."""
    gen = torch.Generator().manual_seed(seed)
    r = radial_frequency(SHAPE, rfft=True)
    m = GEO.wedge_mask(SHAPE)
    amp = (0.3 * m + 1.0 * (1 - m)) * torch.exp(-(r / 0.3) ** 2) + 0.05
    mu = _real(_fourier(gen, 1, amp))[0]
    truth = mu + _real(_fourier(gen, 1, amp))[0]
    family = mu + scale * _real(_fourier(gen, size, amp))
    return family, truth


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_spread_skill_of_synthetic_families(scale):
    family, truth = _gaussian_family(0, 8, scale)
    res = spread_skill(family, truth, GEO)
    # expected: scale * sqrt((S + 1) / S) / sqrt(1 + scale^2 / S), S = 8
    want = scale * math.sqrt(9 / 8) / math.sqrt(1 + scale**2 / 8)
    for value in (res.ratio, res.ratio_measured, res.ratio_wedge):
        assert value == pytest.approx(want, rel=0.1), (value, want)
    if scale == 1.0:
        shells = res.ratio_per_shell("wedge")[2:]
        assert np.all(np.abs(shells - 1) < 0.35), shells
    assert len(res.to_dict()["per_shell"]) == len(res.frequency)


def test_family_spread_of_one_known_mode():
    """Samples mean + c_s g with g = cos(2 pi 3 x / 16), a mode on the kx axis (in the
    measured plane of a Y tilt axis): by Parseval the variance summed over the
    spectrum is var(c) sum g^2, all of it measured; the predictive spread is
    (S + 1) / S times it."""
    x = torch.arange(SHAPE[2], dtype=torch.float64)
    g = torch.cos(2 * math.pi * 3 * x / SHAPE[2]).expand(SHAPE)
    base = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    samples = (base + c[:, None, None, None] * g).float()
    plain = family_spread(samples, GEO, predictive=False)
    want = float(c.var() * (g * g).sum())
    assert plain.sums["measured"].sum() == pytest.approx(want, rel=1e-4)
    assert plain.sums["wedge"].sum() == pytest.approx(0.0, abs=1e-4 * want)
    assert plain.total("measured") == pytest.approx(want / plain.counts["measured"].sum(),
                                                    rel=1e-4)
    pred = family_spread(samples, GEO)
    assert pred.sums["measured"].sum() == pytest.approx(want * 5 / 4, rel=1e-4)
    shell = int(np.nanargmax(pred.per_shell("measured")))
    assert shell == 3  # the mode's shell: 3 / 16 cycles per voxel


def test_central_box_and_crop():
    """The central box: start (n - e) // 2, the whole axis when shorter; `even` lowers
    an odd edge by one; the crop reads exactly those voxels as float32."""
    assert central_box((10, 7, 3), 4) == (slice(3, 7), slice(1, 5), slice(0, 3))
    assert central_box((10, 7, 3), 5) == (slice(2, 7), slice(1, 6), slice(0, 3))
    assert central_box((10, 7, 3), 5, even=True) == (slice(3, 7), slice(1, 5), slice(0, 2))
    assert central_box((1, 9, 9), 96, even=True) == (slice(0, 1), slice(0, 8), slice(0, 8))
    vol = np.arange(10 * 7 * 3, dtype=np.int64).reshape(10, 7, 3)
    crop = central_crop(vol, 5)
    assert crop.dtype == np.float32 and crop.shape == (5, 5, 3)
    assert crop[0, 0, 0] == vol[2, 1, 0] and crop[-1, -1, -1] == vol[6, 5, 2]
    t = crop_of(vol, central_box(vol.shape, 5))
    assert t.dtype == torch.float32 and torch.equal(t, torch.from_numpy(crop))


def test_coverage_of_a_calibrated_gaussian_family():
    s = 19
    family, truth = _gaussian_family(1, s, 1.0)
    for cov in (interval_coverage(family, truth, method="quantile"),
                wedge_coverage(family, truth, GEO, method="quantile")):
        for level in (0.5, 0.9):
            assert cov[level] == pytest.approx(level * (s - 1) / (s + 1), abs=0.05), cov
    for cov in (interval_coverage(family, truth), wedge_coverage(family, truth, GEO)):
        for level in (0.5, 0.9):
            assert cov[level] == pytest.approx(level, abs=0.05), cov
    narrow, truth = _gaussian_family(1, s, 0.4)
    assert wedge_coverage(narrow, truth, GEO)[0.9] < 0.6


def test_wedge_component_keeps_only_the_wedge():
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    w = wedge_component(v, GEO)
    spec = torch.fft.rfftn(w)
    assert float((spec * GEO.wedge_mask(SHAPE)).abs().max()) < 1e-3
    assert torch.allclose(wedge_component(w, GEO), w, atol=1e-5)


def test_fair_crps_of_a_gaussian_family():
    gen = torch.Generator().manual_seed(3)
    truth = torch.randn(SHAPE, generator=gen)
    crps = {c: crps_ensemble(c * torch.randn((8, *SHAPE), generator=gen), truth)
            for c in (0.5, 1.0, 2.0)}
    assert crps[1.0] == pytest.approx(1 / math.sqrt(math.pi), rel=0.05)  # E CRPS = s/sqrt(pi)
    assert crps[1.0] < crps[0.5] and crps[1.0] < crps[2.0]
    rep = crps_report(torch.randn((8, *SHAPE), generator=gen), truth, torch.zeros(SHAPE))
    assert rep["mae_single"] == pytest.approx(math.sqrt(2 / math.pi), rel=0.05)
    assert rep["crps_family"] < rep["mae_single"]


def test_halves_check_reads_one_for_a_calibrated_family():
    world = _World(4)
    d_a, d_b = world.data(), world.data()
    half_b = _real(d_b[None])[0]
    good = halves_check(world.family(d_a, 8), half_b, world.noise_per_shell(), GEO)
    ratio = good["ratio"][1:]
    assert np.nanmedian(np.abs(np.log(ratio))) < 0.15, ratio
    narrow = halves_check(world.family(d_a, 8, scale=0.2), half_b,
                          world.noise_per_shell(), GEO)["ratio"][1:]
    signal = slice(0, 3)  # signal-dominated shells: the spread matters there
    assert np.all(narrow[signal] > 1.5 * ratio[signal]), (narrow, ratio)


def test_measured_residual_ratio_flags_a_family_that_carries_the_noise():
    world = _World(5)
    d = world.data()
    data = _real(d[None])[0]
    noise = world.noise_per_shell()
    calibrated = measured_residual_ratio(world.family(d, 6), data, noise, GEO)["ratio"]
    copied = measured_residual_ratio(world.family(d, 6, carry_noise=True), data, noise,
                                     GEO)["ratio"]
    mean_only = measured_residual_ratio(_real((world.m * world.gain * d)[None]), data,
                                        noise, GEO)["ratio"]
    assert np.nanmedian(np.abs(np.log(calibrated[1:]))) < 0.1, calibrated
    assert np.nanmax(copied) < 1e-6, copied
    # the posterior mean reads 1 - W: near 0 where signal dominates, near 1 in noise
    assert mean_only[1] < 0.3 and mean_only[-1] > 0.8, mean_only
    with pytest.raises(CryowaeInputError, match="one value per shell"):
        measured_residual_ratio(world.family(d, 2), data, noise[:-1], GEO)


def test_ctf_radial_matches_the_simulators_ctf():
    p = CTFParams(defocus=2.5, amplitude_contrast=0.1)
    c2 = ctf_2d((64, 64), 6.0, p)[0]  # ky = 0 row: kx = 0 .. 0.5 cycles per pixel
    c1 = ctf_radial(torch.fft.rfftfreq(64) / 6.0, p)
    assert torch.allclose(c1, c2, atol=1e-5)
    k0 = ctf_first_zero(6.0, p)
    assert 0 < k0 < 0.5
    assert abs(float(ctf_radial(torch.tensor([k0 / 6.0]), p))) < 0.02


def test_truth_seen_by_data_filters_as_documented():
    gen = torch.Generator().manual_seed(6)
    gt = torch.randn(SHAPE, generator=gen)
    p = CTFParams()
    r = radial_frequency(SHAPE, rfft=True)
    spec_gt = torch.fft.rfftn(gt)
    absctf = torch.fft.rfftn(truth_seen_by_data(gt, 8.0, p, "abs_ctf"))
    want = spec_gt * ctf_radial(r / 8.0, p).abs()
    assert torch.allclose(absctf, want, atol=1e-3)
    low = torch.fft.rfftn(truth_seen_by_data(gt, 8.0, p, "first_zero"))
    k0 = ctf_first_zero(8.0, p)
    assert float(low[r >= k0].abs().max()) < 1e-3
    assert torch.allclose(low[r < 0.9 * k0], spec_gt[r < 0.9 * k0], atol=1e-3)
    assert truth_seen_by_data(gt, 8.0, None) is not None
    assert torch.equal(truth_seen_by_data(gt, 8.0, None), gt)
    with pytest.raises(CryowaeInputError, match="truth mode"):
        truth_seen_by_data(gt, 8.0, p, "bogus")


def test_ctf_params_from_meta():
    meta = {"config": {"defocus": 2.0, "voltage": 200.0, "cs": 2.7,
                       "amplitude_contrast": 0.1, "ctf": True}}
    assert ctf_params_from_meta(meta) == CTFParams(2.0, 200.0, 2.7, 0.1)
    assert ctf_params_from_meta({"config": {**meta["config"], "ctf": False}}) is None
    with pytest.raises(CryowaeInputError, match="CTF setting"):
        ctf_params_from_meta({"config": {"ctf": True}})


def test_calibration_input_errors():
    with pytest.raises(CryowaeInputError, match="at least 2"):
        spread_skill(torch.zeros(1, *SHAPE), torch.zeros(SHAPE), GEO)
    with pytest.raises(CryowaeInputError, match="measured mask"):
        spread_skill(torch.zeros(2, *SHAPE), torch.zeros(SHAPE), torch.ones(16, 16, 16))
    with pytest.raises(CryowaeInputError, match="samples must be"):
        crps_ensemble(torch.zeros(3, 8, 8, 8), torch.zeros(SHAPE))


@pytest.mark.slow
def test_abs_ctf_truth_matches_a_noise_free_simulation():
    """A noise-free phase-flipped tomogram is the truth times |CTF| in the measured
    region: `truth_seen_by_data` must match it there far better than the raw truth."""
    from cryowae.metrics.calibration_checks import ctf_params_from_meta
    from cryowae.simulation import SimulationConfig, simulate_tomogram

    cfg = SimulationConfig(size=32, seed=2, noise=False)
    res = simulate_tomogram(cfg)
    seen = truth_seen_by_data(res["gt"], cfg.voxel_size,
                              ctf_params_from_meta({"config": cfg.to_dict()}))
    shape = tuple(res["tomo"].shape)
    m = TiltGeometry().wedge_mask(shape) * (radial_frequency(shape, rfft=True) < 0.4)

    def misfit(ref: torch.Tensor) -> float:
        a, b = torch.fft.rfftn(res["tomo"]) * m, torch.fft.rfftn(ref) * m
        return float((a - b).abs().square().sum() / b.abs().square().sum())

    assert misfit(seen) < 0.5 * misfit(res["gt"]), (misfit(seen), misfit(res["gt"]))
