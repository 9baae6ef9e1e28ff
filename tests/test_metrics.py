"""Metrics measured on synthetic volumes whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics import (
    evaluate_volumes,
    fsc_curve,
    fsc_resolution,
    interval_coverage,
    normalise,
    pearson,
    psnr_db,
    region_correlations,
)
from cryowae.physics.fourier import (
    hermitian_weights,
    masked_fsc,
    radial_frequency,
    shell_index,
)
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import apply_wedge, wedge_mask


def _noise(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _lowpass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Hard spherical low-pass at `cutoff` cycles per voxel."""
    keep = radial_frequency(tuple(v.shape), rfft=True) <= cutoff
    return torch.fft.irfftn(torch.fft.rfftn(v) * keep, s=v.shape)


# ------------------------------------------------------------------ correlation / PSNR


def test_pearson_self_and_independent():
    a = _noise((32, 32, 32), 0)
    assert pearson(a, a) == pytest.approx(1.0, abs=1e-12)
    assert pearson(a, -a) == pytest.approx(-1.0, abs=1e-12)
    # independent noise: |r| ~ 1/sqrt(N) = 0.0055; 5 sigma bound
    r = pearson(a, _noise((32, 32, 32), 1))
    assert abs(r) < 5 / math.sqrt(a.numel())
    # offset and scale do not matter; numpy input works
    assert pearson(3.0 * a.numpy() + 7.0, a) == pytest.approx(1.0, abs=1e-9)


def test_pearson_constant_volume_is_zero():
    a = _noise((8, 8, 8), 0)
    assert pearson(torch.ones_like(a), a) == 0.0


def test_psnr_rises_as_noise_falls_and_ignores_scale():
    g = _noise((24, 32, 32), 0)
    n = _noise((24, 32, 32), 1)
    values = [psnr_db(g + s * n, g) for s in (2.0, 1.0, 0.3, 0.1, 0.01)]
    assert all(b > a + 1.0 for a, b in zip(values, values[1:], strict=False)), values
    # intensity scale and offset of either volume do not change it
    assert psnr_db(100.0 * (g + 0.3 * n) - 5.0, g) == pytest.approx(values[2], abs=1e-4)
    assert psnr_db(g + 0.3 * n, 0.01 * g + 2.0) == pytest.approx(values[2], abs=1e-4)
    assert psnr_db(g, g) == math.inf


def test_psnr_definition_matches_formula():
    g = _noise((16, 16, 16), 0).double()
    r = g + 0.5 * _noise((16, 16, 16), 1).double()
    gn = (g - g.mean()) / g.std(correction=0)
    rn = (r - r.mean()) / r.std(correction=0)
    expect = 10 * math.log10(float(gn.max() - gn.min()) ** 2 / float(((rn - gn) ** 2).mean()))
    assert psnr_db(r, g) == pytest.approx(expect, rel=1e-6)
    nv = normalise(r)
    assert float(nv.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(nv.std(correction=0)) == pytest.approx(1.0, abs=1e-5)


def test_psnr_constant_ground_truth_is_an_input_error():
    with pytest.raises(CryowaeInputError, match="constant"):
        psnr_db(_noise((8, 8, 8), 0), torch.zeros(8, 8, 8))


def test_shape_mismatch_is_an_input_error():
    with pytest.raises(CryowaeInputError, match="differ in shape"):
        pearson(torch.zeros(8, 8, 8), torch.zeros(8, 8, 9))


# --------------------------------------------------------------------------------- FSC


@pytest.mark.parametrize("shape", [(32, 32, 32), (24, 32, 40), (21, 30, 33)])
def test_fsc_identical_is_one_and_resolution_is_nyquist(shape):
    a = _noise(shape, 0)
    curve = fsc_curve(a, a, voxel_size=7.5)
    assert curve.fsc.min() > 0.999
    assert len(curve.fsc) == min(shape) // 2
    assert curve.resolution_at(0.143) == pytest.approx(15.0)
    assert curve.resolution_at(0.5) == pytest.approx(15.0)
    res = [r for r, _ in curve.as_list()]
    assert res == sorted(res, reverse=True)


@pytest.mark.parametrize("cutoff", [0.125, 0.25, 0.375])
def test_fsc_of_low_passed_copy_crosses_at_the_cutoff(cutoff):
    n = 48
    a = _noise((n, n, n), 3)
    b = _lowpass(a, cutoff)
    curve = fsc_curve(a, b, voxel_size=10.0)
    for thr in (0.143, 0.5):
        f_cross = 10.0 / curve.resolution_at(thr)
        assert abs(f_cross - cutoff) <= 1.5 / n, (thr, f_cross)  # within 1.5 shells
    # well below the cutoff the shells agree, well above they do not
    assert curve.fsc[curve.frequency < cutoff - 2 / n].min() > 0.95
    assert np.abs(curve.fsc[curve.frequency > cutoff + 2 / n]).max() < 0.05


def test_fsc_noncubic_low_pass():
    a = _noise((24, 40, 48), 5)
    curve = fsc_curve(a, _lowpass(a, 0.25), voxel_size=5.0)
    assert abs(5.0 / curve.resolution_at(0.143) - 0.25) <= 1.5 / 24


def test_fsc_resolution_interpolates_first_crossing():
    f = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    c = np.array([0.9, 0.7, 0.3, 0.6, 0.1])  # first crossing of 0.5 between 0.2 and 0.3
    assert fsc_resolution(f, c, 0.5, voxel_size=2.0) == pytest.approx(2.0 / 0.25)
    # crossing between DC (FSC 1) and the first shell
    assert fsc_resolution(f, np.full(5, 0.0), 0.5, 1.0) == pytest.approx(1.0 / 0.05)
    assert fsc_resolution(f, np.full(5, 0.9), 0.5, 3.0) == pytest.approx(6.0)


# -------------------------------------------------------------------- Fourier regions


def test_region_correlations_identical_and_wedge_masked():
    g = _noise((32, 32, 32), 0)
    same = region_correlations(g, g)
    assert same["cc_measured"] == pytest.approx(1.0, abs=1e-6)
    assert same["cc_wedge"] == pytest.approx(1.0, abs=1e-6)
    assert same["wedge_power_ratio"] == pytest.approx(1.0, abs=1e-6)
    masked = region_correlations(apply_wedge(g), g)
    assert masked["cc_measured"] == pytest.approx(1.0, abs=1e-6)
    assert masked["cc_wedge"] == 0.0  # empty region: defined as 0
    assert masked["wedge_power_ratio"] == 0.0


def test_region_correlations_wedge_filled_with_unrelated_content():
    g = _noise((32, 32, 32), 0)
    other = _noise((32, 32, 32), 1)
    restored = apply_wedge(g) + (other - apply_wedge(other))  # wrong content in the wedge
    cc = region_correlations(restored, g)
    assert cc["cc_measured"] == pytest.approx(1.0, abs=1e-5)
    assert abs(cc["cc_wedge"]) < 0.05
    assert cc["wedge_power_ratio"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("shape", [(16, 18, 20), (15, 17, 19)])
@pytest.mark.parametrize("axis", ["y", "x"])
def test_region_correlations_match_full_fft(shape, axis):
    a, b = _noise(shape, 0), _noise(shape, 1) + 0.5 * _noise(shape, 0)
    got = region_correlations(a, b, TiltGeometry(-50.0, 35.0, axis))
    fa, fb = torch.fft.fftn(a.double()), torch.fft.fftn(b.double())
    inside = radial_frequency(shape) <= 0.5
    inside[0, 0, 0] = False
    meas = wedge_mask(shape, -50.0, 35.0, axis) > 0.5
    for key, region in (("cc_measured", inside & meas), ("cc_wedge", inside & ~meas)):
        x, y = fa[region], fb[region]
        ref = float((x * y.conj()).real.sum() / torch.sqrt((x.abs() ** 2).sum()
                                                           * (y.abs() ** 2).sum()))
        assert got[key] == pytest.approx(ref, abs=1e-5), key


def test_region_correlations_take_a_tilt_geometry():
    g = _noise((8, 8, 8), 0)
    with pytest.raises(CryowaeInputError, match="tilt range"):
        region_correlations(g, g, TiltGeometry(30.0, 10.0))
    with pytest.raises(TypeError, match="TiltGeometry"):
        region_correlations(g, g, 30.0)  # a loose angle is not a geometry


# ------------------------------------------------------------- masked FSC, Hermitian weights


def test_hermitian_weights_count_the_full_spectrum():
    for nx in (7, 8):
        v = _noise((5, 6, nx), nx).double()
        full = float((torch.fft.fftn(v).abs() ** 2).sum())
        half = torch.fft.rfftn(v).abs() ** 2
        assert float((half * hermitian_weights(nx, torch.float64)).sum()) == pytest.approx(
            full, rel=1e-12)


@pytest.mark.parametrize("shape", [(12, 14, 16), (11, 13, 15)])
def test_masked_fsc_matches_a_full_fft_per_shell(shape):
    a, b = _noise(shape, 0), _noise(shape, 1) + 0.7 * _noise(shape, 0)
    mask = wedge_mask(shape, -50.0, 35.0, "y", rfft=True)
    got = masked_fsc(a, b, mask)
    idx, n_shells = shell_index(shape)
    assert got.shape == (n_shells,) and n_shells == max(shape) // 2 + 1
    # the same sums over the full spectrum, shells from |k| * max(shape), no weights
    fa, fb = torch.fft.fftn(a.double()), torch.fft.fftn(b.double())
    shell = torch.clamp(torch.round(radial_frequency(shape) * max(shape)).long(),
                        max=n_shells - 1)
    region = wedge_mask(shape, -50.0, 35.0, "y") > 0.5
    for s in range(1, n_shells):
        sel = region & (shell == s)
        x, y = fa[sel], fb[sel]
        ref = float((x * y.conj()).real.sum() / torch.sqrt((x.abs() ** 2).sum()
                                                           * (y.abs() ** 2).sum()))
        assert float(got[s]) == pytest.approx(ref, abs=1e-5), s
    # identical volumes: 1 in every shell; without a mask all coefficients count
    assert torch.allclose(masked_fsc(a, a)[1:], torch.ones(n_shells - 1, dtype=torch.float64))
    assert not torch.allclose(masked_fsc(a, b), got)



# ------------------------------------------------------------------------ calibration


def test_interval_coverage_calibrated_gaussian():
    s = 200
    samples = _noise((s, 16, 16, 16), 0)
    gt = _noise((16, 16, 16), 1)
    cov = interval_coverage(samples, gt, levels=(0.5, 0.9), method="quantile")
    for level in (0.5, 0.9):
        expected = level * (s - 1) / (s + 1)
        assert abs(cov[level] - expected) < 0.04, (level, cov[level])


def test_predictive_interval_covers_its_level_for_a_small_family():
    # 16 exact draws: the empirical-quantile 90% interval covers only ~0.79, the
    # Student-t prediction interval 0.90
    samples = _noise((16, 16, 32, 32), 3)
    gt = _noise((16, 32, 32), 4)
    pred = interval_coverage(samples, gt, levels=(0.5, 0.9))
    quant = interval_coverage(samples, gt, levels=(0.5, 0.9), method="quantile")
    assert pred[0.9] == pytest.approx(0.9, abs=0.02), pred
    assert pred[0.5] == pytest.approx(0.5, abs=0.03), pred
    assert quant[0.9] < 0.83, quant


def test_student_t_quantile_matches_tables():
    from cryowae.metrics.calibration import student_t_quantile

    # two-sided 90% / 95% critical values from standard tables
    assert student_t_quantile(0.95, 15) == pytest.approx(1.753, abs=2e-3)
    assert student_t_quantile(0.975, 15) == pytest.approx(2.131, abs=2e-3)
    assert student_t_quantile(0.95, 7) == pytest.approx(1.895, abs=3e-3)


def test_interval_coverage_detects_overconfidence_and_numpy_input():
    samples = 0.5 * _noise((100, 8, 16, 16), 0)
    gt = _noise((8, 16, 16), 1)
    cov = interval_coverage(samples.numpy(), gt.numpy(), levels=(0.5, 0.9))
    # true coverage of N(0, 0.25) intervals for N(0, 1) truth: 0.26 and 0.59
    assert cov[0.5] < 0.35
    assert cov[0.9] < 0.7


def test_interval_coverage_input_errors():
    with pytest.raises(CryowaeInputError):
        interval_coverage(torch.zeros(4, 8, 8, 8), torch.zeros(8, 8, 9))
    with pytest.raises(CryowaeInputError):
        interval_coverage(torch.zeros(1, 8, 8, 8), torch.zeros(8, 8, 8))
    with pytest.raises(CryowaeInputError):
        interval_coverage(torch.zeros(4, 8, 8, 8), torch.zeros(8, 8, 8), levels=(1.5,))


# ---------------------------------------------------------------------------- report


def test_evaluate_volumes_report():
    g = _lowpass(_noise((24, 32, 40), 0), 0.3)
    restored = apply_wedge(g, -55.0, 50.0) + 0.05 * _noise((24, 32, 40), 1)
    rep = evaluate_volumes(restored, g, voxel_size=8.0,
                           geometry=TiltGeometry.from_range(-55, 50, "y", "test"))
    for key in ("pearson", "psnr_db", "fsc_0143_A", "fsc_05_A", "cc_measured", "cc_wedge"):
        assert isinstance(rep[key], float), key
        assert math.isfinite(rep[key]), key
    assert rep["cc_measured"] > 0.9
    assert abs(rep["cc_wedge"]) < 0.2
    assert 16.0 <= rep["fsc_0143_A"] <= rep["fsc_05_A"]
    assert rep["nyquist_A"] == 16.0
    assert rep["shape"] == [24, 32, 40]
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_axis"], rep["tilt_source"]) == (
        -55.0, 50.0, "y", "test")
    # the wedge of the geometry given, not the default -60..60
    assert rep["cc_measured"] > evaluate_volumes(restored, g, 8.0)["cc_measured"] + 0.01
    assert all(len(p) == 2 for p in rep["fsc"])


def test_evaluate_volumes_input_errors():
    g = _noise((8, 8, 8), 0)
    with pytest.raises(CryowaeInputError, match="differ in shape"):
        evaluate_volumes(g, _noise((8, 8, 9), 0), 1.0)
    bad = g.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(CryowaeInputError, match="NaN"):
        evaluate_volumes(bad, g, 1.0)
    with pytest.raises(CryowaeInputError, match="voxel size"):
        evaluate_volumes(g, g, 0.0)
    with pytest.raises(TypeError, match="TiltGeometry"):
        evaluate_volumes(g, g, 1.0, -60.0)
