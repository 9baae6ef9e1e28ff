"""Reconstruction and acquisition filters of the simulator's pipelines
(`cryowae.simulation.pipelines`): WBP filters, direct Fourier insertion, the exposure
filter, and 2x binning.

Frequencies are in cycles per voxel (pixel) unless a name says per Angstrom; images are
(T, Y, X) with the tilt axis Y (the frame of `cryowae.simulation.projection`).

**WBP filters** (`wbp_filter`), each a factor on the ramp ``|k|`` of
`weighted_backprojection` (k on the padded detector line of n samples, 0.5 = Nyquist):

- ``ramp``: 1 (the default simulator's filter);
- ``hamming``: ``0.54 + 0.46 cos(pi k / 0.5)`` (0.08 at Nyquist);
- ``cosine``: ``cos(pi k / (2 * 0.5))`` (0 at Nyquist);
- ``sirt``: the SIRT-like filter (Zeng 2012, Med. Phys. 39:2019; IMOD's
  ``FakeSIRTiterations``, tomo3d's SIRT-like filter). SIRT updates
  ``x <- x + alpha B (p - P x)``; the projector-then-back-projector ``B P`` acts on
  frequency k as ``1 / |k|`` (unit-free after scaling alpha), so after N iterations from
  zero ``x_N = [1 - (1 - alpha / |k|)^N] x_inf``, i.e. WBP with the filter

      w_N(k) = |k| [1 - (1 - alpha / |k|)^N]     (|k| >= alpha),   w_N(k) = |k| otherwise,

  with alpha = 1 / n (the line's lowest nonzero frequency, which one iteration then
  recovers fully). For ``|k| << N alpha`` this is the ramp; for ``|k| >> N alpha`` it
  tends to ``N alpha``, a flat (unweighted) back-projection: few iterations damp high
  frequencies, as SIRT does.

**Direct Fourier insertion** (`fourier_insertion`): each image's 2D DFT is placed as a
central slice of a 3D DFT (torch-fourier-slice ``insert_central_slices_rfft_3d``,
trilinear), the sum is divided by the summed sampling weights ``max(W(k), floor)``
(regularised: the floor bounds the gain where few slices pass), and the inverse is
corrected for the linear interpolation kernel (sinc^2 along Z and X, the two axes
interpolated). The grid is padded ``pad`` times the larger of Z and X along Z and X;
the Y rows fall on the grid exactly and are not padded. Its noise power is flat in the
measured region where slices overlap, unlike WBP's ``|k|`` ramp.

**Exposure filter** (`exposure_filter`, Grant & Grigorieff 2015, eLife 4:e06980): the
critical exposure ``N_e(k) = 0.245 k^-1.665 + 2.81`` e/A^2 (k in 1/A, 300 kV; 0.8 times at
200 kV), and the signal of a tilt taken after an exposure N keeps
``q(k) = exp(-N / (2 N_e(k)))`` of its amplitude. `exposures` gives N per tilt for a
dose-symmetric order (0, then alternately +, - by increasing |angle|).

**Binning** (`bin2`): 2x along the last two (images) or three (volumes) axes, by mean
pooling (IMOD newstack ``-bin``) or by Fourier cropping (keeping the lower half of the
frequencies, the mean preserved).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter

#: WBP filters `wbp_filter` knows
WBP_FILTERS = ("ramp", "hamming", "cosine", "sirt")
#: binning methods of `bin2`
BIN_METHODS = ("mean", "fourier")


def wbp_filter(kind: str, iterations: int = 10):
    """The factor on the ramp of filter `kind` (see the module docstring) as a function
    of (k (cycles per voxel, float64), n (line length)) -> factor, for
    `weighted_backprojection(radial=...)`; None for the plain ramp."""
    if kind not in WBP_FILTERS:
        raise CryowaeInputError(f"unknown WBP filter {kind!r}; known: {', '.join(WBP_FILTERS)}")
    if kind == "ramp":
        return None
    if kind == "hamming":
        return lambda k, n: 0.54 + 0.46 * torch.cos(math.pi * k / 0.5)
    if kind == "cosine":
        return lambda k, n: torch.cos(math.pi * k / 1.0)

    def sirt(k: torch.Tensor, n: int) -> torch.Tensor:
        alpha = 1.0 / n
        base = torch.clamp(1.0 - alpha / torch.clamp(k, min=alpha), min=0.0)
        return 1.0 - base ** int(iterations)

    return sirt


@dataclass(frozen=True)
class InsertionSettings:
    """Direct Fourier insertion: `pad` (grid size along Z and X over max(Z, X), >= 1)
    and `weight_floor` (the smallest summed sampling weight divided by, > 0; a weight
    of 1 is one full slice sample)."""

    pad: float = 2.0
    weight_floor: float = 0.1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pad) and self.pad >= 1.0):
            raise CryowaeInputError(f"insertion pad must be >= 1, got {self.pad:g}")
        if not (math.isfinite(self.weight_floor) and self.weight_floor > 0):
            raise CryowaeInputError(f"insertion weight floor must be positive, got "
                                    f"{self.weight_floor:g}")


def _tilt_rotations(angles_deg: torch.Tensor) -> torch.Tensor:
    """(T, 3, 3) matrices acting on (z, y, x) frequencies that take the central slice
    (kz = 0) of an image to the plane the image samples at tilt theta about Y:
    (kz, kx) = kx_image (sin theta, cos theta) (`cryowae.simulation.projection`)."""
    t = torch.deg2rad(angles_deg.to(torch.float64))
    c, s = torch.cos(t), torch.sin(t)
    zero, one = torch.zeros_like(t), torch.ones_like(t)
    rows = [torch.stack([c, zero, s], -1), torch.stack([zero, one, zero], -1),
            torch.stack([-s, zero, c], -1)]
    return torch.stack(rows, dim=-2).to(torch.float32)


def _centred_pad(images: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Pad the last axis to `n` with edge values, centre pixel X // 2 -> n // 2.
    Returns the padded images and the left pad."""
    x = images.shape[-1]
    left = n // 2 - x // 2
    return F.pad(images, (left, n - x - left), mode="replicate"), left


def fourier_insertion(projections: torch.Tensor, angles_deg: torch.Tensor,
                      shape: tuple[int, int, int],
                      settings: InsertionSettings = InsertionSettings(),
                      progress: ProgressReporter | None = None) -> torch.Tensor:
    """Direct Fourier reconstruction about Y (see the module docstring).

    Parameters
    ----------
    projections
        (T, Y, X) projections in the units of `cryowae.simulation.projection.project_y`
        (sums along rays, voxel lengths); edge-padded to the grid.
    angles_deg
        (T,) tilt angles, degrees.
    shape
        (Z, Y, X) of the reconstruction; Y and X must match the projections.
    settings
        `InsertionSettings`.
    progress
        Optional reporter, advanced by T when the insertion is done.

    Returns
    -------
    torch.Tensor
        (Z, Y, X) float32 in the units of the projected volume.
    """
    from torch_fourier_slice import insert_central_slices_rfft_3d
    from torch_fourier_slice.volume_utils import separable_sinc2_correction

    # not backproject_2d_to_3d: it needs square images and a cube, clamps the weights at 1
    # and corrects sinc^2 along Y too, which is not interpolated here
    zdim, ydim, xdim = (int(v) for v in shape)
    t_n, py, px = projections.shape
    if (py, px) != (ydim, xdim):
        raise ValueError(f"projections {tuple(projections.shape)} do not match the volume "
                         f"shape {tuple(shape)}")
    n = int(math.ceil(settings.pad * max(zdim, xdim)))
    n += n % 2
    grid = (n, ydim, n)
    img, _ = _centred_pad(projections.to(torch.float32), n)
    spec = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(img, dim=(-2, -1)),
                                              dim=(-2, -1)), dim=(-2,))
    angles = torch.as_tensor(angles_deg, dtype=torch.float32).flatten()
    dft, weights = insert_central_slices_rfft_3d(
        image_rfft=spec, volume_shape=grid,
        rotation_matrices=_tilt_rotations(angles).to(projections.device), zyx_matrices=True)
    dft = dft / torch.clamp(weights, min=settings.weight_floor)
    vol = torch.fft.irfftn(torch.fft.ifftshift(dft, dim=(-3, -2)), dim=(-3, -2, -1), s=grid)
    vol = torch.fft.fftshift(vol, dim=(-3, -2, -1))
    # Y is not interpolated (rows fall on the grid), so the correction spans Z and X only
    vol = vol / separable_sinc2_correction((n, 1, n), device=vol.device)
    if progress is not None:
        progress.check_cancelled("simulation")
        progress.advance(t_n)
    z0 = n // 2 - zdim // 2
    x0 = n // 2 - xdim // 2
    return vol[z0:z0 + zdim, :, x0:x0 + xdim].contiguous().to(torch.float32)


def critical_exposure(k_per_A: torch.Tensor, voltage_kv: float = 300.0) -> torch.Tensor:
    """Critical exposure N_e(k) in e/A^2 (Grant & Grigorieff 2015), k in 1/A (k = 0:
    infinite); scaled by 0.8 at 200 kV, linearly in between and clamped outside."""
    # hand-written: torch-fourier-filter has this formula but pulls in starfile and pyarrow
    scale = 0.8 + 0.2 * min(max((voltage_kv - 200.0) / 100.0, 0.0), 1.0)
    k = torch.clamp(k_per_A, min=1e-12)
    return scale * (0.245 * k ** -1.665 + 2.81)


def exposures(angles_deg: torch.Tensor, dose_per_tilt: float) -> torch.Tensor:
    """Electron exposure (e/A^2) each tilt has received by the middle of its own
    exposure, for a dose-symmetric order: the tilt nearest 0 first, then by increasing
    |angle|, the positive one of a pair first. (T,) float64, in the order of `angles_deg`."""
    a = torch.as_tensor(angles_deg, dtype=torch.float64).flatten()
    key = torch.abs(a) * 2 + (a < 0).to(torch.float64) * 1e-6
    rank = torch.empty_like(a)
    rank[torch.argsort(key)] = torch.arange(a.numel(), dtype=torch.float64)
    return (rank + 0.5) * float(dose_per_tilt)


def exposure_filter(images: torch.Tensor, voxel_size: float, exposure: torch.Tensor,
                    voltage_kv: float = 300.0) -> torch.Tensor:
    """Multiply the spectrum of each (T, Y, X) image by q(k) = exp(-N_t / (2 N_e(k))),
    N_t = `exposure[t]` (e/A^2); images mirror-padded by max(8, n/8) like the CTF."""
    t, y, x = images.shape
    p = max(1, min(max(8, min(y, x) // 8), min(y, x) - 1))
    im = F.pad(images.to(torch.float32)[:, None], (p, p, p, p), mode="reflect")[:, 0]
    ky = torch.fft.fftfreq(im.shape[-2], d=voxel_size, device=images.device)
    kx = torch.fft.rfftfreq(im.shape[-1], d=voxel_size, device=images.device)
    k = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).to(torch.float64)
    ne = critical_exposure(k, voltage_kv)
    n_t = exposure.to(torch.float64).to(images.device)[:, None, None]
    q = torch.exp(-n_t / (2 * ne[None])).to(torch.float32)
    out = torch.fft.irfft2(torch.fft.rfft2(im) * q, s=im.shape[-2:])
    return out[:, p:p + y, p:p + x].contiguous()


def bin2(array: torch.Tensor, method: str, dims: int) -> torch.Tensor:
    """Bin the last `dims` (2 or 3) axes of `array` by 2 with `method` (``mean``:
    2x mean pooling; ``fourier``: keep the central half of the frequencies, values
    scaled so that the mean is kept). Axes must be even."""
    if method not in BIN_METHODS:
        raise CryowaeInputError(f"unknown binning {method!r}; known: {', '.join(BIN_METHODS)}")
    shape = tuple(int(s) for s in array.shape[-dims:])
    if any(s % 2 for s in shape):
        raise ValueError(f"cannot bin odd axes {shape} by 2")
    lead = array.shape[:-dims]
    a = array.to(torch.float32).reshape(-1, 1, *shape)
    if method == "mean":
        pool = F.avg_pool2d if dims == 2 else F.avg_pool3d
        return pool(a, 2)[:, 0].reshape(*lead, *(s // 2 for s in shape))
    axes = tuple(range(-dims, 0))
    spec = torch.fft.fftshift(torch.fft.fftn(a[:, 0], dim=axes, norm="forward"), dim=axes)
    sl = tuple(slice(s // 2 - s // 4, s // 2 - s // 4 + s // 2) for s in shape)
    spec = spec[(...,) + sl]
    out = torch.fft.ifftn(torch.fft.ifftshift(spec, dim=axes), dim=axes, norm="forward").real
    return out.reshape(*lead, *(s // 2 for s in shape)).contiguous()
