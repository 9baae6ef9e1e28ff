"""Per-voxel calibration figures (metrics/uncertainty.py, metrics/sparsification.py) on
families and maps whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.calibration import crps_ensemble, interval_coverage, spread_skill
from cryowae.metrics.sparsification import (
    gaussian_smooth,
    local_detail_power_map,
    local_deviation_map,
    local_magnitude_map,
    sparsification,
)
from cryowae.metrics.uncertainty import (
    family_mean_std,
    outside_range_fraction,
    predicted_std,
    reliability,
)
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry

SHAPE = (24, 32, 32)
GEO = TiltGeometry(-50.0, 50.0)
S = 16


def _field(gen: torch.Generator, n: int) -> torch.Tensor:
    """n stationary Gaussian fields with a smooth spectrum, unit variance per voxel."""
    amp = torch.exp(-(radial_frequency(SHAPE) / 0.2) ** 2)
    amp = amp / amp.square().mean().sqrt()  # ortho FFT: variance = mean of amp^2
    w = torch.fft.fftn(torch.randn((n, *SHAPE), generator=gen), dim=(-3, -2, -1),
                       norm="ortho")
    return torch.fft.ifftn(w * amp, dim=(-3, -2, -1), norm="ortho").real


def _sigma() -> torch.Tensor:
    """A voxel-varying std from 0.2 to 2 (a factor 10 along X, 1.5 along Z)."""
    x = torch.linspace(0.0, 1.0, SHAPE[2])
    z = torch.linspace(0.0, 1.0, SHAPE[0])
    return 0.2 * 10 ** x[None, None, :] * (1 + 0.5 * z[:, None, None]) / 1.5


def _family(scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth and S samples i.i.d. from N(mu, sigma(x)^2) (smooth spectrum), the samples'
    deviations from mu times `scale`."""
    gen = torch.Generator().manual_seed(seed)
    mu = 3.0 * _field(gen, 1)[0]
    sig = _sigma()
    truth = mu + sig * _field(gen, 1)[0]
    return mu + scale * sig * _field(gen, S), truth


def _outside_probability(scale: float, s: int) -> float:
    """P(y outside the range of s draws of N(0, scale^2)), y ~ N(0, 1), by quadrature."""
    y = np.linspace(-10, 10, 20001)
    cdf = np.array([0.5 * (1 + math.erf(v / (scale * math.sqrt(2)))) for v in y])
    pdf = np.exp(-y**2 / 2) / math.sqrt(2 * math.pi)
    return float(np.trapezoid(pdf * (cdf**s + (1 - cdf) ** s), y))


def _ence_expected(scale: float, s: int) -> float:
    """|RMV - RMSE| / RMV when every bin's RMV = scale sigma sqrt((s+1)/s) and its
    RMSE = sigma sqrt(1 + scale^2 / s)."""
    rmv = scale * math.sqrt((s + 1) / s)
    return abs(rmv - math.sqrt(1 + scale**2 / s)) / rmv


@pytest.mark.parametrize("scale", [1.0, 2.0, 0.5])
def test_family_with_voxel_varying_sigma(scale):
    samples, truth = _family(scale)
    ss = spread_skill(samples, truth, GEO)
    want = scale * math.sqrt((S + 1) / S) / math.sqrt(1 + scale**2 / S)
    for v in (ss.ratio, ss.ratio_measured, ss.ratio_wedge):
        assert v == pytest.approx(want, rel=0.1), (v, want)
    rng = outside_range_fraction(samples, truth)
    assert rng["ideal"] == pytest.approx(2 / (S + 1))
    expected = _outside_probability(scale, S)
    if scale == 1.0:
        assert expected == pytest.approx(2 / (S + 1), abs=1e-4)  # the quadrature itself
    assert rng["fraction"] == pytest.approx(expected, abs=0.025), (rng, expected)
    mean, std = family_mean_std(samples)
    rel = reliability(predicted_std(std, S), mean - truth)
    assert len(rel.rmv) == 10 and rel.count.sum() == truth.numel()
    if scale == 1.0:
        assert rel.ence < 0.12, rel  # above 0: bins chosen by the estimated std
        cov = interval_coverage(samples, truth)
        assert cov[0.5] == pytest.approx(0.5, abs=0.04) and cov[0.9] == pytest.approx(
            0.9, abs=0.03), cov
    else:
        # the bins' selection by the estimated std moves it by up to about 0.1
        assert rel.ence == pytest.approx(_ence_expected(scale, S), abs=0.15), rel
        assert rel.ence > 0.35


def test_family_mean_std_and_predicted_std():
    samples, _ = _family(1.0, seed=1)
    mean, std = family_mean_std(samples)
    assert torch.allclose(mean, samples.mean(0), atol=1e-5)
    assert torch.allclose(std, samples.std(0), atol=1e-5)
    assert torch.allclose(predicted_std(std, 3), std * math.sqrt(4 / 3))
    with pytest.raises(CryowaeInputError, match="at least 2"):
        predicted_std(std, 1)


def test_reliability_of_an_exact_std_map():
    """An error drawn with a known per-voxel std, scored against that std (ENCE 0 up to
    sampling error) and twice it (|2 - 1| / 2 = 0.5 in every bin)."""
    gen = torch.Generator().manual_seed(2)
    sig = torch.rand(64, 64, 64, generator=gen) * 3 + 0.1
    err = sig * torch.randn(sig.shape, generator=gen)
    good = reliability(sig, err)
    assert good.ence < 0.03, good
    assert np.allclose(good.rmse / good.rmv, 1.0, atol=0.06)
    assert reliability(2 * sig, err).ence == pytest.approx(0.5, abs=0.02)
    assert np.all(np.diff(good.rmv) > 0)  # bins sorted by the predicted std
    with pytest.raises(CryowaeInputError, match="negative"):
        reliability(-sig, err)
    with pytest.raises(CryowaeInputError, match="differ in size"):
        reliability(sig[:2], err)


def test_sparsification_curve_of_an_indicator_map():
    """Errors 1 on a region holding a fraction p of the voxels, 0 elsewhere; the map is
    the region's indicator: RMSE(f) = sqrt((p - f) / (1 - f)) for f < p, then 0, which is
    also the oracle's; gain 1."""
    e = torch.zeros(16, 16, 16)
    e[2:6, 3:11, 5:13] = 1.0  # 256 of 4096 voxels: p = 1/16
    sp = sparsification(e.clone(), e, n_points=64)
    p = 256 / 4096
    f = sp.fraction
    want = np.sqrt(np.clip(p - f, 0, None) / (1 - f))
    assert np.allclose(sp.rmse, want, atol=1e-9) and np.allclose(sp.oracle_rmse, want)
    assert np.allclose(sp.mae, np.clip(p - f, 0, None) / (1 - f), atol=1e-9)
    assert sp.random_rmse == pytest.approx(math.sqrt(p))
    assert sp.gain == pytest.approx(1.0, abs=1e-9) and sp.gain_mae == pytest.approx(1.0)
    # a constant map removes voxels in random order: exactly the random curve
    flat = sparsification(torch.ones_like(e), e, n_points=64)
    assert np.allclose(flat.rmse, math.sqrt(p)) and abs(flat.gain) < 1e-9
    # the reversed map removes the error-free voxels first: below 0
    assert sparsification(-e, e, n_points=64).gain < -0.5


def test_std_map_of_a_family_whose_error_sits_in_one_region():
    """Samples = truth + (1 + 0.2 eps) on a known region, exact elsewhere: the family
    mean's error lives in the region and so does the std; the std map ranks the region
    first (gain near 1), a random map scores about 0."""
    gen = torch.Generator().manual_seed(3)
    truth = torch.randn(20, 24, 24, generator=gen)
    region = torch.zeros_like(truth, dtype=torch.bool)
    region[5:13, 4:16, 8:20] = True
    samples = truth + region * (1.0 + 0.2 * torch.randn((8, *truth.shape), generator=gen))
    mean, std = family_mean_std(samples)
    err = mean - truth
    sp = sparsification(predicted_std(std, 8), err)
    assert sp.gain > 0.95, sp.gain
    gains = [sparsification(torch.rand(truth.shape, generator=gen), err).gain
             for _ in range(5)]
    assert abs(float(np.mean(gains))) < 0.05, gains


def test_restoration_only_maps_find_a_noisy_region():
    """A smooth truth restored exactly except for white noise on one region: the local
    deviation and detail power rank that region first; the local magnitude, which also
    follows the truth's own amplitude, less well but far better than at random."""
    gen = torch.Generator().manual_seed(4)
    truth = gaussian_smooth(torch.randn(24, 32, 32, generator=gen), 3.0) * 10
    region = torch.zeros_like(truth, dtype=torch.bool)
    region[6:18, 8:24, 8:24] = True
    restored = truth + region * 0.5 * torch.randn(truth.shape, generator=gen)
    err = restored - truth
    for m in (local_deviation_map(restored), local_detail_power_map(restored)):
        assert sparsification(m, err).gain > 0.75
    assert 0.4 < sparsification(local_magnitude_map(restored), err).gain < 0.75
    flat = torch.full((8, 8, 8), 2.5)
    assert local_magnitude_map(flat).abs().max() < 1e-6
    assert local_detail_power_map(torch.full((8, 8, 8), 2.5)).abs().max() < 1e-4


def test_gaussian_smooth_known_answers():
    d = torch.zeros(21, 21, 21)
    d[10, 10, 10] = 1.0
    g = gaussian_smooth(d, 2.0).double()
    z = torch.arange(21, dtype=torch.float64) - 10
    assert float(g.sum()) == pytest.approx(1.0, abs=1e-5)
    for axis in range(3):
        marginal = g.sum(dim=tuple(a for a in range(3) if a != axis))
        assert float((marginal * z**2).sum()) == pytest.approx(4.0, rel=1e-3)  # sigma^2
    # mirrored edges: a constant and a linear ramp along an axis pass unchanged
    ramp = torch.arange(12, dtype=torch.float32)[None, None, :].expand(10, 11, 12)
    assert torch.allclose(gaussian_smooth(torch.full((10, 11, 12), 3.0), 2.0),
                          torch.full((10, 11, 12), 3.0), atol=1e-5)
    assert torch.allclose(gaussian_smooth(ramp, 1.0)[:, :, 4:8], ramp[:, :, 4:8], atol=2e-3)
    with pytest.raises(CryowaeInputError, match="positive"):
        gaussian_smooth(d, 0.0)


def test_crps_matches_its_definition():
    """The scoringrules estimator against the fair CRPS written out pairwise."""
    gen = torch.Generator().manual_seed(5)
    samples = torch.randn((5, 4, 6, 6), generator=gen)
    truth = torch.randn((4, 6, 6), generator=gen)
    skill = (samples - truth).abs().mean(0)
    spread = (samples[:, None] - samples[None]).abs().sum((0, 1)) / (2 * 5 * 4)
    assert crps_ensemble(samples, truth) == pytest.approx(float((skill - spread).mean()),
                                                          rel=1e-6)


def test_outside_range_errors():
    with pytest.raises(CryowaeInputError, match="samples must be"):
        outside_range_fraction(torch.zeros(3, 4, 4, 4), torch.zeros(4, 4, 5))
    with pytest.raises(CryowaeInputError, match="cannot draw"):
        sparsification(torch.zeros(2, 2, 2), torch.zeros(2, 2, 2), n_points=100)
