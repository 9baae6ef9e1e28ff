"""Missing-wedge geometry: Fourier sampling masks of a single-axis tilt series.

Convention (used by the simulator's projector too): arrays are (Z, Y, X), the beam is
along Z at zero tilt, and the tilt axis is Y. The projection recorded at tilt angle
theta (degrees) samples the central plane of Fourier space that contains the ky axis
and the direction (kz, kx) = (sin theta, cos theta). A frequency (kz, ky, kx) is
therefore measured when its elevation ``atan(kz / kx)`` lies in [tilt_min, tilt_max];
the ky axis itself (kz = kx = 0) lies in every plane and is always measured. With
``tilt_axis="x"`` the roles of ky and kx are swapped.

All functions are pure: tensors in, tensors out. Masks are float tensors of 0/1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.fourier import fourier_grid

#: tilt axes cryowae knows (lower case, as in the array's axis names)
TILT_AXES = ("y", "x")


def check_tilt_range(tilt_min: float, tilt_max: float) -> None:
    """Raise `CryowaeInputError` unless -90 < tilt_min < tilt_max < 90 (degrees)."""
    if not (-90.0 < tilt_min < tilt_max < 90.0):
        raise CryowaeInputError(
            f"impossible tilt range {tilt_min:g}..{tilt_max:g} degrees: need "
            "-90 < tilt-min < tilt-max < 90"
        )


def check_tilt_axis(tilt_axis: str) -> str:
    """The tilt axis in lower case (``"y"`` or ``"x"``; upper case accepted); raise
    `CryowaeInputError` for any other."""
    axis = str(tilt_axis).lower()
    if axis not in TILT_AXES:
        raise CryowaeInputError(f"unknown tilt axis {tilt_axis!r}: use Y or X")
    return axis


def _elevation_deg(k: torch.Tensor, tilt_axis: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Elevation angle (degrees, in [-90, 90]) of each frequency out of the tilt plane,
    and a boolean marking the tilt axis itself (where the angle is undefined)."""
    kz = k[..., 0]
    kin = k[..., 2] if check_tilt_axis(tilt_axis) == "y" else k[..., 1]
    # Friedel-symmetric: (kz, kin) and (-kz, -kin) give the same elevation.
    sign = torch.where(kin < 0, -1.0, 1.0).to(k.dtype)
    elev = torch.rad2deg(torch.atan2(kz * sign, kin.abs()))
    on_axis = (kz.abs() < 1e-12) & (kin.abs() < 1e-12)
    # atan2 gives +-90 for kin == 0; both ends denote the same direction (beam axis)
    return elev, on_axis


def _nyquist_readings(shape: tuple[int, int, int], rfft: bool, tilt_axis: str,
                      device: torch.device | str | None) -> list[torch.Tensor]:
    """The frequency grid, plus copies with the Nyquist coordinate of the axes that
    enter the elevation negated (one copy per combination)."""
    k = fourier_grid(shape, rfft=rfft, device=device)
    axes = [0, 2] if tilt_axis == "y" else [0, 1]
    grids = [k]
    for ax in axes:
        if shape[ax] % 2 == 0 and shape[ax] > 1:
            flipped = []
            for g in grids:
                g2 = g.clone()
                nyq = g2[..., ax].abs() == 0.5
                g2[..., ax] = torch.where(nyq, -g2[..., ax], g2[..., ax])
                flipped.append(g2)
            grids += flipped
    return grids


def _rotated_grid(shape: tuple[int, int, int], rfft: bool, rotation: torch.Tensor | None,
                  device: torch.device | str | None) -> torch.Tensor:
    k = fourier_grid(shape, rfft=rfft, device=device)
    if rotation is None:
        return k
    r = rotation.to(device=k.device, dtype=k.dtype)
    if r.ndim == 2:
        r = r[None]
    # A volume rotated as v'(p) = v(R^T p) has V'(k) = V(R^T k): look the mask up at R^T k.
    return torch.einsum("bji,zyxj->bzyxi", r, k)


def wedge_mask(shape: Sequence[int], tilt_min: float = -60.0, tilt_max: float = 60.0,
               tilt_axis: str = "y", rfft: bool = False,
               rotation: torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Fourier sampling mask of a tilt series over [tilt_min, tilt_max] degrees.

    Parameters
    ----------
    shape
        (Z, Y, X) of the real-space volume.
    tilt_min, tilt_max
        Tilt range in degrees; asymmetric ranges are allowed.
    tilt_axis
        ``"y"`` (default) or ``"x"``.
    rfft
        Return the mask for ``torch.fft.rfftn`` output (last axis X // 2 + 1).
    rotation
        Optional (3, 3) or (B, 3, 3) rotation acting on (z, y, x) coordinates, applied
        to the volume with `rotate_volume`; the mask is rotated with it (exactly, by
        evaluating the geometry at R^T k, without interpolation).

    Returns
    -------
    torch.Tensor
        (Z, Y, X[//2+1]) float mask of 1 (measured) / 0 (missing), or (B, Z, Y, X[//2+1])
        when `rotation` is batched.
    """
    check_tilt_range(tilt_min, tilt_max)
    tilt_axis = check_tilt_axis(tilt_axis)
    shp = tuple(int(s) for s in shape)
    measured = None
    # For even sizes the Nyquist frequency stands for both +0.5 and -0.5 cycles/voxel:
    # a point there is measured only if both readings are, which keeps the mask
    # Friedel-symmetric (m(k) == m(-k)) on the discrete grid.
    for k in _nyquist_readings(shp, rfft, tilt_axis, device):
        if rotation is not None:
            r = rotation.to(device=k.device, dtype=k.dtype)
            k = torch.einsum("bji,zyxj->bzyxi", r[None] if r.ndim == 2 else r, k)
        elev, on_axis = _elevation_deg(k, tilt_axis)
        # half-open [tilt_min, tilt_max): grid points lying exactly on a boundary (e.g.
        # the diagonals at +-45 degrees) are counted once, so the measured fraction of
        # Fourier space equals (tilt_max - tilt_min) / 180 on the grid too
        m = ((elev >= tilt_min) & (elev < tilt_max)) | on_axis
        measured = m if measured is None else measured & m
    assert measured is not None
    if tilt_max - tilt_min >= 180.0 - 1e-9:
        measured = torch.ones_like(measured)
    # the beam direction (elevation +-90) is measured only if the range reaches 90
    out = measured.to(torch.float32)
    if rotation is not None and rotation.ndim == 2:
        out = out[0]
    return out


def wedge_mask_from_angles(shape: Sequence[int], angles: Sequence[float] | torch.Tensor,
                           tilt_axis: str = "y", rfft: bool = False,
                           slice_thickness: float | None = None,
                           rotation: torch.Tensor | None = None,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Fourier sampling mask for an explicit list of tilt angles (degrees).

    With ``slice_thickness=None`` the tilts are taken to fill their range
    [min(angles), max(angles)] (the usual missing-wedge model). With a thickness in
    Fourier voxels (about 1 for an unfiltered back-projection), each tilt samples only
    a slab of that thickness around its central plane, so high frequencies between
    tilts with large increments are left unmeasured (Crowther's criterion).
    """
    a = torch.as_tensor(angles, dtype=torch.float32).flatten()
    if a.numel() < 2:
        raise CryowaeInputError("need at least two tilt angles")
    lo, hi = float(a.min()), float(a.max())
    if slice_thickness is None:
        return wedge_mask(shape, lo, hi, tilt_axis, rfft, rotation, device)
    check_tilt_range(lo, hi)
    tilt_axis = check_tilt_axis(tilt_axis)
    shp = tuple(int(s) for s in shape)
    k = _rotated_grid(shp, rfft, rotation, device)  # type: ignore[arg-type]
    kz = k[..., 0]
    kin = k[..., 2] if tilt_axis == "y" else k[..., 1]
    n_ref = float(max(shp[0], shp[2] if tilt_axis == "y" else shp[1]))
    th = torch.deg2rad(a.to(k.device))
    # distance (in Fourier voxels) from each point to each tilt's central plane
    dist = (kz[..., None] * torch.cos(th) - kin[..., None] * torch.sin(th)).abs() * n_ref
    measured = (dist <= slice_thickness / 2).any(dim=-1)
    out = measured.to(torch.float32)
    if rotation is not None and rotation.ndim == 2:
        out = out[0]
    return out


def apply_fourier_mask(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Multiply the spectrum of a real volume (..., Z, Y, X) by a Fourier mask.

    `mask` is either a full mask (..., Z, Y, X) or an rfft mask (..., Z, Y, X // 2 + 1);
    it broadcasts over leading axes. Returns a real tensor of the volume's shape.
    """
    shape = volume.shape[-3:]
    if mask.shape[-1] == shape[-1] // 2 + 1 and mask.shape[-1] != shape[-1]:
        spec = torch.fft.rfftn(volume, dim=(-3, -2, -1))
        return torch.fft.irfftn(spec * mask, s=shape, dim=(-3, -2, -1))
    if mask.shape[-1] == shape[-1] and shape[-1] // 2 + 1 == shape[-1]:
        # X of 1 or 2: full and rfft masks coincide; use rfft
        spec = torch.fft.rfftn(volume, dim=(-3, -2, -1))
        return torch.fft.irfftn(spec * mask, s=shape, dim=(-3, -2, -1))
    spec = torch.fft.fftn(volume, dim=(-3, -2, -1))
    return torch.fft.ifftn(spec * mask, dim=(-3, -2, -1)).real


def apply_wedge(volume: torch.Tensor, tilt_min: float = -60.0, tilt_max: float = 60.0,
                tilt_axis: str = "y") -> torch.Tensor:
    """Remove the missing wedge of [tilt_min, tilt_max] from a volume (..., Z, Y, X)."""
    mask = wedge_mask(volume.shape[-3:], tilt_min, tilt_max, tilt_axis, rfft=True,
                      device=volume.device)
    return apply_fourier_mask(volume, mask)
