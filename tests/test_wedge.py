"""Missing-wedge masks and rotations: symmetry, measured fraction, idempotence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.rotation import random_rotations, rotate_volume
from cryowae.physics.wedge import (
    apply_fourier_mask,
    apply_wedge,
    check_tilt_axis,
    wedge_mask,
    wedge_mask_from_angles,
)


def _friedel(m: torch.Tensor) -> torch.Tensor:
    return torch.roll(torch.flip(m, (0, 1, 2)), (1, 1, 1), (0, 1, 2))


@pytest.mark.parametrize("shape", [(64, 64, 64), (33, 48, 40)])
@pytest.mark.parametrize("rng", [(-60, 60), (-54, 66), (-30, 45)])
def test_friedel_symmetry(shape, rng):
    m = wedge_mask(shape, *rng)
    assert torch.equal(_friedel(m), m)


@pytest.mark.parametrize("rng", [(-60, 60), (-54, 66), (-45, 45), (-70, 50)])
@pytest.mark.parametrize("axis", ["y", "x"])
def test_measured_fraction_matches_tilt_span(rng, axis):
    m = wedge_mask((64, 64, 64), *rng, tilt_axis=axis)
    inside = radial_frequency((64, 64, 64)) <= 0.5
    frac = float(m[inside].mean())
    expected = (rng[1] - rng[0]) / 180
    assert abs(frac - expected) < 0.01 * expected, (frac, expected)


def test_rfft_mask_matches_full_mask():
    full = wedge_mask((32, 40, 48), -54, 66)
    half = wedge_mask((32, 40, 48), -54, 66, rfft=True)
    assert torch.equal(full[..., : 48 // 2 + 1], half)


def test_applying_twice_equals_once():
    v = torch.randn(40, 48, 44, generator=torch.Generator().manual_seed(0))
    once = apply_wedge(v, -60, 60)
    twice = apply_wedge(once, -60, 60)
    assert float((once - twice).abs().max()) < 1e-5
    # and the mask really removes power: about a third of a white-noise volume's
    removed = 1 - float((once**2).sum() / (v**2).sum())
    assert 0.25 < removed < 0.40


def test_angle_list_mask():
    angles = np.arange(-60, 61, 3.0)
    assert torch.equal(wedge_mask_from_angles((32, 32, 32), angles), wedge_mask((32, 32, 32)))
    sparse = wedge_mask_from_angles((64, 64, 64), np.arange(-60, 61, 15.0), slice_thickness=1)
    dense = wedge_mask_from_angles((64, 64, 64), np.arange(-60, 61, 1.0), slice_thickness=1)
    inside = radial_frequency((64, 64, 64)) <= 0.5
    # large increments leave high frequencies between tilts unmeasured (Crowther)
    assert float(sparse[inside].mean()) < 0.5 * float(dense[inside].mean())
    low = radial_frequency((64, 64, 64)) < 0.02
    assert float(sparse[low].mean()) == float(dense[low].mean())


def test_mask_rotates_with_the_volume():
    """The rotated mask is the support of the rotated wedge-limited volume's spectrum."""
    g = torch.Generator().manual_seed(1)
    v = apply_wedge(torch.randn(48, 48, 48, generator=g), -50, 50)
    r = random_rotations(1, generator=g)
    rv = rotate_volume(v[None, None], r)[0, 0]
    spec = torch.fft.rfftn(rv).abs() ** 2
    m = wedge_mask((48, 48, 48), -50, 50, rfft=True, rotation=r[0])
    inside = radial_frequency((48, 48, 48), rfft=True) < 0.35
    frac_in = float(spec[(m > 0) & inside].sum() / spec[inside].sum())
    unrotated = wedge_mask((48, 48, 48), -50, 50, rfft=True)
    frac_unrot = float(spec[(unrotated > 0) & inside].sum() / spec[inside].sum())
    assert frac_in > 0.9 and frac_in > frac_unrot + 0.05, (frac_in, frac_unrot)


def test_identity_rotation_is_exact():
    """Up to float32 rounding of the sampling coordinates (about 1e-5 of the values)."""
    v = torch.randn(1, 1, 20, 24, 28, generator=torch.Generator().manual_seed(0))
    out = rotate_volume(v, torch.eye(3)[None])
    assert float((out - v).abs().max()) < 1e-4


def test_impossible_tilt_range():
    for lo, hi in [(60, -60), (-95, 60), (-60, 90), (10, 10)]:
        with pytest.raises(CryowaeInputError):
            wedge_mask((16, 16, 16), lo, hi)


def test_mask_with_full_spectrum_keeps_volume():
    v = torch.randn(16, 16, 16)
    m = torch.ones(16, 16, 9)
    assert float((apply_fourier_mask(v, m) - v).abs().max()) < 1e-5


def test_random_rotations_from_torch_and_numpy_generators():
    """One implementation for both sources of randomness: orthonormal, determinant 1,
    reproducible per seed, and uniform (the mean of R over SO(3) is 0)."""
    for make in (lambda: torch.Generator().manual_seed(3), lambda: np.random.default_rng(3)):
        r = random_rotations(4000, generator=make(), dtype=torch.float64)
        assert r.dtype == torch.float64 and r.shape == (4000, 3, 3)
        eye = torch.eye(3, dtype=torch.float64).expand(4000, 3, 3)
        assert torch.allclose(r @ r.transpose(1, 2), eye, atol=1e-12)
        assert torch.allclose(torch.linalg.det(r), torch.ones(4000, dtype=torch.float64))
        assert float(r.mean(0).abs().max()) < 0.05  # 1/sqrt(4000) ~ 0.016 per entry
        assert torch.equal(random_rotations(4000, generator=make(), dtype=torch.float64), r)
    # a numpy generator draws exactly four normals per rotation, so scene code that
    # mixes rotations with other numpy draws keeps its random stream
    rng = np.random.default_rng(5)
    random_rotations(2, generator=rng)
    ref = np.random.default_rng(5)
    ref.normal(size=(2, 4))
    assert rng.normal() == ref.normal()
    assert random_rotations(1).dtype == torch.float32


def test_tilt_axis_is_checked_once_for_masks_and_geometry():
    assert check_tilt_axis("Y") == "y" and check_tilt_axis("x") == "x"
    assert torch.equal(wedge_mask((8, 8, 8), tilt_axis="X"), wedge_mask((8, 8, 8), tilt_axis="x"))
    for bad in ("z", ""):
        with pytest.raises(CryowaeInputError, match="unknown tilt axis"):
            wedge_mask((8, 8, 8), tilt_axis=bad)
        with pytest.raises(CryowaeInputError, match="unknown tilt axis"):
            TiltGeometry(-60, 60, bad)
    with pytest.raises(CryowaeInputError, match="impossible tilt range"):
        TiltGeometry(60, -60)
