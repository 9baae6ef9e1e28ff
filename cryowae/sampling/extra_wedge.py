"""The self-supervised extra-wedge task on a (crop of a) tomogram: what the restoration
gets wrong where the data measured what its input lacks, with no ground truth.

The data x (measured region M of the tilt geometry) lose a second wedge, the first one
rotated by ``rotation_deg`` about Z (`LocalSpreadSettings`): the input is
``F^-1[M_R F x]``, the training task of `cryowae.training.augment.make_batch` with the
rotation on the mask. In the band B = M minus M_R (`extra_wedge_band`) the data
measured what the input lacks, so the restoration's error there,

    e_B = F^-1[1_B F(R(x_R) - x)],

is observed up to the data's noise, which is independent of the input in B. The
self-check (`cryowae.sampling.selfcheck`) compares the family's wedge spread with this
error per shell (a lower bound: B is part of the measured region, where the input
still holds more than in the true wedge) and its local variance with p = G_w * e_B^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics.sparsification import gaussian_smooth
from cryowae.physics.fourier import hermitian_weights, nyquist_sphere, radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import wedge_mask
from cryowae.sampling.local_spread import LocalSpreadSettings

_DIMS = (-3, -2, -1)


def _rotation_z(deg: float) -> torch.Tensor:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    # (z, y, x) coordinates: a rotation in the Y-X plane
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rotated_measured(shape: tuple[int, int, int], geometry: TiltGeometry,
                      st: LocalSpreadSettings) -> torch.Tensor:
    """M_R (rfft bool mask): the measured region rotated by ``rotation_deg`` about Z."""
    return wedge_mask(shape, geometry.tilt_min, geometry.tilt_max, geometry.axis, rfft=True,
                      rotation=_rotation_z(st.rotation_deg)) > 0.5


def _band(shape: tuple[int, int, int], geometry: TiltGeometry,
          rotated: torch.Tensor) -> torch.Tensor:
    """M less `rotated` (M_R), within the Nyquist sphere."""
    return (geometry.wedge_mask(shape, rfft=True) > 0.5) & ~rotated & nyquist_sphere(shape)


def extra_wedge_band(shape: tuple[int, int, int], geometry: TiltGeometry,
                     settings: LocalSpreadSettings | None = None) -> torch.Tensor:
    """B (rfft bool mask of a (Z, Y, X) grid): the measured region less the wedge
    rotated by ``rotation_deg`` about Z, within the Nyquist sphere (`extra_wedge_task`)."""
    st = settings or LocalSpreadSettings()
    return _band(shape, geometry, _rotated_measured(shape, geometry, st))


@dataclass
class ExtraWedgeTask:
    """The self-supervised extra-wedge task on one (crop of a) tomogram
    (`extra_wedge_task`), which the self-check (`cryowae.sampling.selfcheck`) reads.

    restoration: R(x_R) (Z, Y, X); error_power: p = G_w * e_B^2; noise_power: n_B (the
    data noise's local power in B); band: B (rfft mask); shell_error and shell_count:
    per shell of `cryowae.physics.fourier.shell_index`, mean |R(x_R) - x|^2 - N over the
    coefficients of B (data units squared per coefficient) and their number."""

    restoration: torch.Tensor
    error_power: torch.Tensor
    noise_power: float
    band: torch.Tensor
    shell_error: np.ndarray
    shell_count: np.ndarray


def extra_wedge_task(restore: Callable[[np.ndarray], Any], data: Any,
                     geometry: TiltGeometry, noise: Any = None,
                     settings: LocalSpreadSettings | None = None) -> ExtraWedgeTask:
    """Restore `data` (Z, Y, X) without a second, rotated wedge and measure the error
    in the band the data hold and the input lacks.

    The data x (measured region M of the tilt geometry) lose a second wedge rotated by
    ``rotation_deg`` about Z (input ``F^-1[M_R F x]``, the training task of
    `cryowae.training.augment.make_batch` with the rotation on the mask). In the band
    B = M minus M_R the data measured what the input lacks, so the restoration's error
    there, e_B = ``F^-1[1_B F(R(x_R) - x)]``, is observed up to the data's noise, which
    is independent of the input in B and has the local power n_B = sum_B N(k) / voxels
    (ortho FFT, full-spectrum counting).

    `restore` maps a (Z, Y, X) float32 array to its restoration (same units);
    `noise` a `cryowae.training.noise.NoiseSpectrum` of the data in B (the noise need
    not be isotropic within a shell: `cryowae.training.slab_noise.crop_noise` with
    `extra_wedge_band` as the region; default: the ramp fit `noise_without_halves`)."""
    from cryowae.metrics.calibration import SpectralGrid
    from cryowae.training.noise import noise_without_halves

    st = settings or LocalSpreadSettings()
    x = torch.as_tensor(np.ascontiguousarray(np.asarray(data, dtype=np.float32)))
    shape = tuple(int(v) for v in x.shape)
    if len(shape) != 3:
        raise CryowaeInputError(f"local spread: data must be (Z, Y, X), got {shape}")
    if noise is None:
        noise = noise_without_halves(x, geometry)
    m_r = _rotated_measured(shape, geometry, st)
    band = _band(shape, geometry, m_r)  # M_R once, for the input and the band
    fx = torch.fft.rfftn(x.double(), dim=_DIMS, norm="ortho")
    x_in = torch.fft.irfftn(fx * m_r, s=shape, dim=_DIMS, norm="ortho").float()
    r = torch.as_tensor(np.asarray(restore(x_in.numpy()), dtype=np.float32)).double()
    diff = torch.fft.rfftn(r, dim=_DIMS, norm="ortho") - fx
    e_b = torch.fft.irfftn(diff * band, s=shape, dim=_DIMS, norm="ortho")
    n_k = noise.at(radial_frequency(shape, rfft=True)).double()
    w = hermitian_weights(shape[-1], torch.float64).expand(n_k.shape)
    voxels = float(np.prod(shape))
    n_b = float((w * n_k * band).sum()) / voxels
    grid = SpectralGrid.of(shape, geometry)
    count = grid.shell_sums(torch.ones(band.shape), band)
    with np.errstate(invalid="ignore", divide="ignore"):
        shell_error = grid.shell_sums(diff.abs().square() - n_k, band) / count
    return ExtraWedgeTask(r.float(), gaussian_smooth(e_b**2, st.window_sigma), n_b, band,
                          shell_error, count)


__all__ = ["ExtraWedgeTask", "extra_wedge_band", "extra_wedge_task"]
