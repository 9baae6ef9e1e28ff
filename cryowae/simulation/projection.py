"""Projection and weighted back-projection for a single tilt axis (Y).

Geometry (the convention of `cryowae.physics.wedge`): volumes are (Z, Y, X) with the
beam along Z at zero tilt and the tilt axis Y. The projection at tilt theta integrates
along the ray direction (z, x) = (cos theta, -sin theta); its detector coordinate is
``u = (z - cz) sin theta + (x - cx) cos theta`` (voxels, relative to the centre
``(cz, cx) = (Z // 2, X // 2)``, detector centre ``X // 2``). By the central-slice
theorem its 1D spectrum is the volume's spectrum on the line (kz, kx) =
k (sin theta, cos theta) of every ky plane, which is what `wedge_mask` marks measured.
Projections have shape (T, Y, X): the detector is as wide as the volume (the field of
view), with pixels of one voxel.

Method, and why not torch-fourier-slice: a tilt about one axis needs only the central
*lines* of each XZ plane's spectrum, so the projector evaluates them exactly, as a
non-uniform DFT (two matrix products per tilt), instead of interpolating a padded DFT.
`torch_fourier_slice.project_3d_to_2d` / `project_2d_to_1d` divide the volume by a
sinc^2 interpolation correction that also applies where no interpolation happens (at
zero tilt, and along ky at every tilt): with torch-fourier-slice 0.6.0 (default
``pad_factor=2``) a Gaussian blob (sigma 2.5 voxels) 50 voxels off-centre along one axis
of a 128^3 box came out 14% too strong at zero tilt (3D and 2D), 29% when off-centre
along two axes, so particle contrast would depend on where a particle sits. The library
offers no 1D-to-2D back-projection either, so the projector and this back-projection
do not use it (the Fourier-insertion pipeline does: `reconstruct.fourier_insertion`).
The back-projector is the exact adjoint of this projector with a ramp filter
(|k|, cycles per voxel, with the DC term set from the area of the central disc),
i.e. weighted back-projection with trigonometric (sinc) instead of linear
interpolation of the filtered projections.

All functions are pure and work on float32 CPU or GPU tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cryowae.physics.fourier import hermitian_weights
from cryowae.progress import ProgressReporter


def _padded_length(shape_zx: tuple[int, int], width: int) -> int:
    """Even detector length (voxels) over which projections are held periodic.

    It must exceed the full projected width of the slab (at most sqrt(Z^2 + X^2)) so the
    periodic extension never folds one side of the slab onto the other; 25% more keeps
    the ramp filter's tails from wrapping around.
    """
    z, x = shape_zx
    n = int(math.ceil(1.25 * math.hypot(z, x)))
    n = max(n, width + 8)
    return n + (n % 2)


def _tick(progress: ProgressReporter | None) -> None:
    if progress is not None:
        progress.check_cancelled("simulation")
        progress.advance(1)


def _angles_rad(angles_deg: torch.Tensor | Sequence[float], device) -> torch.Tensor:
    return torch.deg2rad(torch.as_tensor(angles_deg, dtype=torch.float64,
                                         device=device).flatten())


def _phase(a: torch.Tensor, b: torch.Tensor, factor: float) -> torch.Tensor:
    """exp(2 pi i factor a b) as a complex64 (len(a), len(b)) matrix (float64 phases,
    reduced modulo one turn before the cast, for accuracy)."""
    ang = torch.outer(a, b) * factor
    ang = torch.remainder(ang, 1.0) * (2 * math.pi)
    return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)


def project_y(volume: torch.Tensor, angles_deg: torch.Tensor | Sequence[float],
              progress: ProgressReporter | None = None) -> torch.Tensor:
    """Line integrals through a (Z, Y, X) volume at the given tilts about Y.

    Parameters
    ----------
    volume
        (Z, Y, X) float tensor, any units per voxel.
    angles_deg
        (T,) tilt angles in degrees.
    progress
        Optional `ProgressReporter`; advanced by one per tilt (a cancel request raises
        `cryowae.progress.Cancelled`).

    Returns
    -------
    torch.Tensor
        (T, Y, X) projections: sums of voxel values along each ray (unit = the volume's
        unit times one voxel length), band-limited to the detector's Nyquist frequency.
        At zero tilt this is exactly ``volume.sum(0)``.
    """
    zdim, ydim, xdim = volume.shape
    dev = volume.device
    th = _angles_rad(angles_deg, dev)
    n = _padded_length((zdim, xdim), xdim)
    k = torch.fft.rfftfreq(n, device=dev, dtype=torch.float64)  # cycles / voxel
    zc = torch.arange(zdim, device=dev, dtype=torch.float64) - zdim // 2
    xc = torch.arange(xdim, device=dev, dtype=torch.float64) - xdim // 2
    vol = volume.to(torch.float32).reshape(zdim * ydim, xdim)
    out = torch.empty(th.numel(), ydim, xdim, dtype=torch.float32, device=dev)
    for i, t in enumerate(th.tolist()):
        s, c = math.sin(t), math.cos(t)
        ex = torch.view_as_real(_phase(xc, k, -c))  # (X, K, 2): exp(-2 pi i k c x)
        ez = _phase(zc, k, -s)  # (Z, K): exp(-2 pi i k s z)
        # sum over x: one real matrix product for the real and imaginary parts
        spec = (vol @ ex.reshape(xdim, -1)).reshape(zdim, ydim, -1, 2)
        spec = torch.view_as_complex(spec.contiguous())
        spec = torch.einsum("zyk,zk->yk", spec, ez)  # sum over z: (Y, K)
        line = torch.fft.irfft(spec, n=n, dim=-1)  # offsets 0..n-1 from the centre
        out[i] = torch.roll(line, xdim // 2, dims=-1)[:, :xdim]
        _tick(progress)
    return out


def tilt_weights(angles_deg: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Angular weight (radians) of each tilt: half the gap to its two neighbours (the
    full gap to the only neighbour at either end). For evenly spaced tilts every weight
    is the step, and the even- and odd-indexed subsets get twice the step each."""
    a = torch.as_tensor(angles_deg, dtype=torch.float64).flatten()
    order = torch.argsort(a)
    s = torch.deg2rad(a[order])
    if s.numel() < 2:
        return torch.full_like(a, math.pi)
    gaps = s[1:] - s[:-1]
    w = torch.empty_like(s)
    w[1:-1] = (gaps[1:] + gaps[:-1]) / 2
    w[0], w[-1] = gaps[0], gaps[-1]
    out = torch.empty_like(w)
    out[order] = w
    return out


def weighted_backprojection(projections: torch.Tensor,
                            angles_deg: torch.Tensor | Sequence[float],
                            shape: tuple[int, int, int],
                            weights: torch.Tensor | None = None,
                            progress: ProgressReporter | None = None,
                            radial: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                            ) -> torch.Tensor:
    """Weighted (ramp-filtered) back-projection about Y: the inverse of `project_y`
    where the tilts sample Fourier space.

    Parameters
    ----------
    projections
        (T, Y, X) projections, as returned by `project_y` (sums along rays, in voxel
        lengths).
    angles_deg
        (T,) tilt angles in degrees.
    shape
        (Z, Y, X) of the reconstruction; Y and X must match the projections.
    weights
        (T,) angular weights in radians; default `tilt_weights(angles_deg)`.
    progress
        Optional `ProgressReporter`; advanced by one per tilt (a cancel request raises
        `cryowae.progress.Cancelled`).
    radial
        Optional apodization: ``radial(k, n)`` (k the float64 rfft frequencies of the
        padded detector line, cycles per voxel; n its length) multiplies the ramp
        (`cryowae.simulation.reconstruct.wbp_filter`); None: the ramp alone.

    Returns
    -------
    torch.Tensor
        (Z, Y, X) float32 reconstruction in the units of the projected volume: in the
        measured region of Fourier space it reproduces the volume's spectrum (filtered
        by whatever the projections carry), the missing wedge is empty.
    """
    zdim, ydim, xdim = (int(v) for v in shape)
    t_n, py, px = projections.shape
    if (py, px) != (ydim, xdim):
        raise ValueError(f"projections {tuple(projections.shape)} do not match the volume "
                         f"shape {tuple(shape)}")
    dev = projections.device
    th = _angles_rad(angles_deg, dev)
    w = tilt_weights(th.rad2deg().cpu()) if weights is None else torch.as_tensor(
        weights, dtype=torch.float64).flatten()
    n = _padded_length((zdim, xdim), xdim)
    k = torch.fft.rfftfreq(n, device=dev, dtype=torch.float64)
    # ramp filter |k| (times dk = 1/n from the inverse DFT below); at k = 0 the central
    # disc of radius dk/2, shared by all tilts, gives pi dk / (4 sum(w)).
    ramp = k.clone()
    ramp[0] = math.pi / (4 * n * float(w.sum()))
    herm = hermitian_weights(n, torch.float64, dev)  # rfft half spectrum: count +k and -k
    filt = ramp * herm / n
    if radial is not None:
        filt = filt * radial(k, n)
    filt = filt.to(torch.float32)
    # detector data placed on the periodic length n, centre at offset 0, with the gap
    # beyond the field of view filled by the edge values (avoids ramp-filter ringing
    # at the truncated detector edges)
    p = projections.to(torch.float32)
    left = xdim // 2
    gap = n - xdim
    padded = F.pad(p, (gap - gap // 2, gap // 2), mode="replicate")  # (T, Y, n)
    # centre pixel (index left of the field of view) -> offset 0 of the periodic line
    padded = torch.roll(padded, -(gap - gap // 2 + left), dims=-1)
    spec = torch.fft.rfft(padded, dim=-1) * filt  # (T, Y, K)
    zc = torch.arange(zdim, device=dev, dtype=torch.float64) - zdim // 2
    xc = torch.arange(xdim, device=dev, dtype=torch.float64) - xdim // 2
    out = torch.zeros(zdim * ydim, xdim, dtype=torch.float32, device=dev)
    for i, t in enumerate(th.tolist()):
        s, c = math.sin(t), math.cos(t)
        ez = _phase(zc, k, s)  # (Z, K): exp(+2 pi i k s z)
        ex = _phase(k, xc, c)  # (K, X): exp(+2 pi i k c x)
        b = (spec[i] * float(w[i]))[None] * ez[:, None, :]  # (Z, Y, K)
        # Re(b @ ex) as one real matrix product: [re, im] @ [[re(ex)], [-im(ex)]]
        b = torch.view_as_real(b).reshape(zdim * ydim, -1)
        e = torch.stack([ex.real, -ex.imag], dim=1).reshape(-1, xdim)
        out += b @ e
        _tick(progress)
    return out.reshape(zdim, ydim, xdim)
