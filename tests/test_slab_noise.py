"""The noise power from empty Z slabs (cryowae.training.slab_noise) against noise of
known power per shell, built in Fourier space: white, ramp-filtered and Hamming-apodized
ramp noise in the measured region of a (-60, 60) tilt range, added to a smooth
specimen that fills only the middle Z planes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
from cryowae.metrics.streaks import gaussian_lowpass
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.training.noise import noise_without_halves
from cryowae.training.slab_noise import SlabSettings, find_empty_slabs, noise_from_empty_slabs

SHAPE = (64, 48, 48)
SPECIMEN = slice(22, 42)  # Z planes holding structure; the rest is empty
GEO = TiltGeometry(-60.0, 60.0, "y", "test")


def _specimen(seed: int, planes: slice = SPECIMEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = gaussian_lowpass(torch.randn(SHAPE, generator=g, dtype=torch.float64), 1.5)
    s = s / s.std()
    out = torch.zeros(SHAPE, dtype=torch.float64)
    out[planes] = s[planes]
    return out


def _noise(seed: int, gain2) -> tuple[torch.Tensor, np.ndarray]:
    """Noise of power gain2(|k|) in the measured region (none in the wedge), and its
    known power per shell: the mean of gain2 over each shell's measured coefficients."""
    g = torch.Generator().manual_seed(seed)
    r = radial_frequency(SHAPE, rfft=True).double()
    m = GEO.wedge_mask(SHAPE, rfft=True).double()
    power = gain2(r)
    white = torch.fft.rfftn(torch.randn(SHAPE, generator=g, dtype=torch.float64), norm="ortho")
    noise = torch.fft.irfftn(white * power.sqrt() * m, s=SHAPE, norm="ortho")
    grid = SpectralGrid.of(SHAPE, GEO)
    with np.errstate(invalid="ignore", divide="ignore"):
        known = grid.shell_sums(power, grid.measured) / grid.shell_sums(
            torch.ones_like(power), grid.measured)
    return noise, known


def _ramp(r: torch.Tensor) -> torch.Tensor:
    return r / 0.5


def _hamming(r: torch.Tensor) -> torch.Tensor:
    """ramp x Hamming window: 0.08 of the ramp at Nyquist."""
    return r / 0.5 * (0.54 + 0.46 * torch.cos(2 * math.pi * r.clamp(max=0.5)))


#: shells resolved by the slabs (about 18 planes: 2 / L is about 0.11 cycles/voxel)
_BAND = (shell_frequencies(SHAPE) >= 0.15) & (shell_frequencies(SHAPE) < 0.5)


def _ratio(est: np.ndarray, known: np.ndarray) -> np.ndarray:
    return est[_BAND] / known[_BAND]


def test_slabs_found_outside_the_specimen():
    vol = _specimen(0) + _noise(1, lambda r: torch.ones_like(r))[0]
    found = find_empty_slabs(vol)
    assert found.reason == ""
    assert len(found.slabs) == 2
    for sl in found.slabs:
        assert sl.stop <= SPECIMEN.start or sl.start >= SPECIMEN.stop
        assert sl.stop - sl.start >= 12  # most of the 22 empty planes on each side


@pytest.mark.parametrize("gain2", [lambda r: torch.ones_like(r), _ramp, _hamming],
                         ids=["white", "ramp", "hamming"])
def test_slab_estimate_recovers_known_noise(gain2):
    noise, known = _noise(2, gain2)
    est = noise_from_empty_slabs(_specimen(3) + noise, GEO)
    assert est.source.startswith("empty Z slabs")
    assert np.array_equal(est.frequency, shell_frequencies(SHAPE))
    r = _ratio(est.power, known)
    assert abs(np.median(r) - 1) < 0.06
    assert np.all(np.abs(r - 1) < 0.3)


def test_ramp_fit_holds_for_ramp_noise_and_fails_for_hamming():
    """The claim: the old ramp fit is right for a ramp and wrong for an apodized ramp,
    where the slab estimate is not."""
    spec = _specimen(4)
    noise, known = _noise(5, _ramp)
    r = _ratio(noise_without_halves(spec + noise, GEO).power, known)
    assert abs(np.median(r) - 1) < 0.06
    noise, known = _noise(5, _hamming)
    vol = spec + noise
    ramp = _ratio(noise_without_halves(vol, GEO).power, known)
    slab = _ratio(noise_from_empty_slabs(vol, GEO).power, known)
    assert np.median(ramp) < 0.6  # fitted above 0.35 where the window has cut the noise
    assert abs(np.median(slab) - 1) < 0.06


def test_no_empty_slab_falls_back_with_the_reason():
    noise, _ = _noise(6, _ramp)
    vol = _specimen(7, slice(0, SHAPE[0])) + noise
    est = noise_from_empty_slabs(vol, GEO)
    assert "no Z structure contrast" in est.source or "no empty slab" in est.source
    assert est.source.startswith("power above 0.35")
    np.testing.assert_allclose(est.power, noise_without_halves(vol, GEO).power)


def test_too_few_planes_and_a_mask_fall_back():
    noise, _ = _noise(8, _ramp)
    vol = _specimen(9) + noise  # 22 empty planes at each face
    found = find_empty_slabs(vol, SlabSettings(min_slab=24))
    assert "no empty slab of 24 planes" in found.reason and found.slabs == ()
    mask = GEO.wedge_mask(SHAPE, rfft=True)
    est = noise_from_empty_slabs(vol, mask)
    assert "a measured mask, not a tilt geometry" in est.source


def test_settings_validated():
    with pytest.raises(CryowaeInputError):
        SlabSettings(empty_factor=1.0)
    with pytest.raises(CryowaeInputError):
        SlabSettings(min_slab=3)
    with pytest.raises(CryowaeInputError):
        SlabSettings(smoothing=0)


def test_crop_noise_finds_the_slabs_in_the_crops_column():
    """A central crop holding only specimen planes: the slabs are looked for in its
    column (all Z planes), the power comes back on the crop's shells."""
    from cryowae.physics.crop import central_box
    from cryowae.sampling.consistency import noise_of_data
    from cryowae.training.slab_noise import column_box, crop_noise

    noise, _ = _noise(10, lambda r: torch.ones_like(r))  # white: power 1 in every shell
    vol = (_specimen(11) + noise).float()
    box = central_box(SHAPE, 20, even=True)  # Z planes 22-41: the specimen only
    crop = vol[box]
    assert noise_from_empty_slabs(crop, GEO).source.startswith("power above 0.35")
    est = crop_noise(vol, box, GEO)
    assert est.source.startswith("empty Z slabs")
    freq = shell_frequencies(crop.shape)
    assert np.array_equal(est.frequency, freq)
    band = (freq >= 0.15) & (freq < 0.5)
    assert abs(np.median(est.power[band]) - 1) < 0.06
    same = noise_of_data(crop, GEO, None, None, column=vol[column_box(SHAPE, box)])
    np.testing.assert_allclose(same.power, est.power)


def test_default_simulation_keeps_the_ramp_fit():
    """`cryowae simulate` fills its slab with specimen: the few quiet planes at its
    faces are too thin to be used, so its tomograms keep the ramp fit."""
    from cryowae.simulation.config import SimulationConfig
    from cryowae.simulation.simulate import simulate_tomogram

    cfg = SimulationConfig(size=64, seed=0)
    tomo = simulate_tomogram(cfg)["tomo"]
    found = find_empty_slabs(tomo)
    assert found.slabs == () and "no empty slab of 8 planes" in found.reason
    est = noise_from_empty_slabs(tomo, cfg.geometry)
    np.testing.assert_allclose(est.power, noise_without_halves(tomo, cfg.geometry).power)


@pytest.mark.parametrize("gain2", [lambda r: torch.ones_like(r), _ramp], ids=["white", "ramp"])
def test_thin_slabs_window_correction(gain2):
    """Slabs of 6 planes: the taper's kz blur moves measured power into the wedge (about
    12% of it here); dividing by the reference R puts it back."""
    from cryowae.training.slab_noise import slab_noise

    noise, known = _noise(12, gain2)
    slabs = tuple(slice(a, a + 6) for a in range(0, SHAPE[0], 12))
    est, weight = slab_noise(noise, slabs, GEO)
    r = _ratio(est, known)
    assert abs(np.median(r) - 1) < 0.05
    assert np.all(np.abs(r - 1) < 0.2)
    assert np.all(weight[_BAND] > 0)


def test_noise_of_a_part_of_each_shell():
    """Noise whose power grows with |kx| / |k| (as weighted back-projection's grows
    away from the tilt axis): the estimate in a region of the measured one (here
    |kx| > |ky|) follows that region's own power, not the shell's average."""
    k = radial_frequency(SHAPE, rfft=True).double()
    kx = torch.fft.rfftfreq(SHAPE[2]).double()[None, None, :].expand(SHAPE[0], SHAPE[1], -1)

    def gain2(r: torch.Tensor) -> torch.Tensor:
        return 0.2 + 2.0 * (kx.abs() / r.clamp_min(1e-9)) ** 2

    def region(shape: tuple[int, int, int]) -> torch.Tensor:
        gx = torch.fft.rfftfreq(shape[2]).double()[None, None, :]
        gy = torch.fft.fftfreq(shape[1]).double()[None, :, None]
        return ((gx.abs() > gy.abs()).expand(shape[0], -1, -1)
                & (GEO.wedge_mask(shape, rfft=True) > 0.5))

    noise, _ = _noise(7, gain2)
    vol = _specimen(8) + noise
    grid = SpectralGrid.of(SHAPE, GEO)
    part = region(SHAPE)
    power = gain2(k)
    with np.errstate(invalid="ignore", divide="ignore"):
        known_part = grid.shell_sums(power, part) / grid.shell_sums(torch.ones_like(power), part)
        known_all = grid.shell_sums(power, grid.measured) / grid.shell_sums(
            torch.ones_like(power), grid.measured)
    est_part = noise_from_empty_slabs(vol, GEO, region=region)
    est_all = noise_from_empty_slabs(vol, GEO)
    assert "part of the measured region" in est_part.source
    freq = shell_frequencies(SHAPE)
    assert np.all(known_part[_BAND] > 1.2 * known_all[_BAND])  # the part is noisier
    ratio = est_part.at(torch.as_tensor(freq)).numpy()[_BAND] / known_part[_BAND]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.12), ratio
    assert np.median(est_all.at(torch.as_tensor(freq)).numpy()[_BAND] / known_all[_BAND]) \
        == pytest.approx(1.0, abs=0.12)
