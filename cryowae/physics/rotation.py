"""Random 3D rotations and rotation of volumes on the device (torch, not scipy)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def random_rotations(n: int, generator: torch.Generator | np.random.Generator | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`n` rotation matrices (n, 3, 3), uniform on SO(3), acting on (z, y, x) vectors.

    Uniform quaternions from normalised 4D Gaussians (Shoemake); written here in five
    lines rather than pulling torch-so3's healpy/astropy stack into the core install.
    The Gaussians come from `generator`: a torch generator (``torch.randn``), or a numpy
    one (``generator.normal(size=(n, 4))``, for code whose randomness is all numpy, such
    as the simulator's scenes). The matrices are computed in float64 and returned in
    `dtype`.
    """
    if isinstance(generator, np.random.Generator):
        q = torch.from_numpy(generator.normal(size=(n, 4)))
    else:
        q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    r = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], dim=1).reshape(n, 3, 3)
    return r.to(device=device, dtype=dtype)


def rotate_volume(volume: torch.Tensor, rotation: torch.Tensor,
                  out_shape: tuple[int, int, int] | None = None,
                  mode: str = "bilinear") -> torch.Tensor:
    """Rotate volumes about their centres: out(p) = volume(R^T p), p in (z, y, x) voxels.

    Parameters
    ----------
    volume
        (B, C, Z, Y, X) tensor.
    rotation
        (B, 3, 3) rotations acting on (z, y, x) coordinates.
    out_shape
        Optional (Z', Y', X') of the output, centred on the input's centre: crop a
        smaller cube out of a larger, rotated one so no corner falls outside the data.
    mode
        ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
    """
    b = volume.shape[0]
    in_shape = torch.tensor(volume.shape[-3:], dtype=torch.float32, device=volume.device)
    out = torch.tensor(out_shape or volume.shape[-3:], dtype=torch.float32,
                       device=volume.device)
    r = rotation.to(device=volume.device, dtype=torch.float32)
    # normalised -> voxel (half extents), reorder zyx -> xyz for affine_grid
    rev = [2, 1, 0]
    s_in = torch.diag(1.0 / (in_shape[rev] / 2))
    s_out = torch.diag(out[rev] / 2)
    rt = r.transpose(1, 2)[:, rev][:, :, rev]
    theta = s_in @ rt @ s_out
    theta = torch.cat([theta, torch.zeros(b, 3, 1, device=volume.device)], dim=2)
    size = (b, volume.shape[1], *[int(v) for v in out.tolist()])
    grid = F.affine_grid(theta, list(size), align_corners=False)
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=False)
