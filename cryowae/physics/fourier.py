"""Fourier-space grids shared by the physics functions."""

from __future__ import annotations

import torch


def fourier_grid(shape: tuple[int, int, int], rfft: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frequencies of a (Z, Y, X) grid in cycles per voxel, unshifted (FFT order).

    Returns a tensor of shape (Z, Y, X, 3) (X -> X // 2 + 1 when `rfft`), the last axis
    ordered (kz, ky, kx).
    """
    z, y, x = (int(s) for s in shape)
    kz = torch.fft.fftfreq(z, device=device, dtype=dtype)
    ky = torch.fft.fftfreq(y, device=device, dtype=dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(x, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(kz, ky, kx, indexing="ij"), dim=-1)


def radial_frequency(shape: tuple[int, int, int], rfft: bool = False,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """|k| in cycles per voxel on a (Z, Y, X) grid (X halved when `rfft`)."""
    return fourier_grid(shape, rfft=rfft, device=device).norm(dim=-1)
