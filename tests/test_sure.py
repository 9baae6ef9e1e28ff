"""SURE of a restoration's per-shell error (cryowae/sampling/sure.py): on data with
Gaussian noise of a known spectrum it recovers the true error of restorers whose
error is known (identity, zero, a linear filter, a nonlinear shrinkage), within the
sampling error of one noise draw."""

from __future__ import annotations

import numpy as np
import torch

from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling.sure import sure_shell_error
from cryowae.training.noise import NoiseSpectrum, draw_noise

GEO = TiltGeometry(-60.0, 60.0, "y", "model")
SHAPE = (32, 48, 48)
DIMS = (-3, -2, -1)


def _case(seed: int = 0) -> dict:
    """Signal s (power falling with |k|, measured region only), noise n with the ramp
    spectrum 0.5 |k| of weighted back-projection in the measured region, x = s + n."""
    gen = torch.Generator().manual_seed(seed)
    freq = shell_frequencies(SHAPE)
    noise = NoiseSpectrum(freq, 0.5 * np.maximum(freq, freq[1]), "test ramp")
    grid = SpectralGrid.of(SHAPE, GEO)
    k = radial_frequency(SHAPE, rfft=True)
    white = torch.fft.rfftn(torch.randn(SHAPE, generator=gen), dim=DIMS, norm="ortho")
    sig = white * (2.0 / (1.0 + (k / 0.1) ** 2)).sqrt() * grid.measured
    s = torch.fft.irfftn(sig, s=SHAPE, dim=DIMS, norm="ortho")
    n = draw_noise(noise, SHAPE, generator=gen, measured=grid.measured)[0, 0]
    return {"s": s.numpy(), "x": (s + n).numpy(), "noise": noise, "grid": grid}


def _true_error(c: dict, restored: np.ndarray) -> np.ndarray:
    grid = c["grid"]
    diff = torch.fft.rfftn(torch.as_tensor(restored - c["s"]), dim=DIMS, norm="ortho")
    ones = torch.ones(grid.measured.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (grid.shell_sums(diff.abs().square(), grid.measured)
                / grid.shell_sums(ones, grid.measured))


def _bands(c: dict, values: np.ndarray) -> np.ndarray:
    """Sums over four frequency bands (0.05-0.5 cycles per voxel), weighted by the
    shells' coefficient counts: one draw's sampling error averages out there."""
    grid = c["grid"]
    count = grid.shell_sums(torch.ones(grid.measured.shape), grid.measured)
    f = shell_frequencies(SHAPE)
    edges = np.linspace(0.05, 0.5, 5)
    return np.array([np.nansum((values * count)[(f >= lo) & (f < hi)])
                     for lo, hi in zip(edges[:-1], edges[1:], strict=True)])


def _filter(x: np.ndarray, gain: torch.Tensor) -> np.ndarray:
    spec = torch.fft.rfftn(torch.as_tensor(x), dim=DIMS, norm="ortho") * gain
    return torch.fft.irfftn(spec, s=x.shape, dim=DIMS, norm="ortho").numpy()


def test_identity_and_zero_restorers():
    """R(x) = x has the noise as its error; R(x) = 0 the signal power."""
    c = _case()
    ident = sure_shell_error(lambda a: a, c["x"], GEO, c["noise"])
    np.testing.assert_allclose(_bands(c, ident.error), _bands(c, _true_error(c, c["x"])),
                               rtol=0.05)
    zero = sure_shell_error(lambda a: np.zeros_like(a), c["x"], GEO, c["noise"])
    assert np.allclose(np.nan_to_num(zero.divergence), 0.0, atol=1e-6)
    np.testing.assert_allclose(_bands(c, zero.error),
                               _bands(c, _true_error(c, np.zeros_like(c["x"]))), rtol=0.1)


def test_linear_and_nonlinear_restorers():
    """A Wiener-like low-pass (linear) and a soft-threshold in real space (nonlinear):
    SURE is within 10% of the true error per band, where the residual alone
    (residual - noise, no divergence term) is off by more than 15% in every band."""
    c = _case(1)
    k = radial_frequency(SHAPE, rfft=True)
    gain = 1.0 / (1.0 + (k / 0.12) ** 2)

    def low_pass(a: np.ndarray) -> np.ndarray:
        return _filter(a, gain)

    def shrink(a: np.ndarray) -> np.ndarray:
        b = low_pass(a)
        return np.sign(b) * np.maximum(np.abs(b) - 0.2 * b.std(), 0.0)

    for restore in (low_pass, shrink):
        est = sure_shell_error(restore, c["x"], GEO, c["noise"], seed=3)
        truth = _bands(c, _true_error(c, restore(c["x"])))
        np.testing.assert_allclose(_bands(c, est.error), truth, rtol=0.1)
        naive = _bands(c, est.residual - est.noise)
        assert np.min(np.abs(naive / truth - 1)) > 0.15
