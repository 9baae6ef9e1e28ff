"""3D convolutional building blocks: conv-norm-act, residual units, FiLM conditioning."""

from __future__ import annotations

import torch
from torch import nn


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups: independent of the batch size (batches of 1-4)."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvBlock(nn.Module):
    """Two 3x3x3 convolutions with GroupNorm and SiLU, and a residual connection.

    (B, C_in, Z, Y, X) -> (B, C_out, Z, Y, X)
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm1 = group_norm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.norm2 = group_norm(c_out)
        self.act = nn.SiLU()
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, film: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        if film is not None:
            gamma, beta = film.chunk(2, dim=1)
            h = h * (1 + gamma[..., None, None, None]) + beta[..., None, None, None]
        return self.act(h + self.skip(x))


class Down(nn.Module):
    """Halve Z, Y, X with a strided 2x2x2 convolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Up(nn.Module):
    """Double Z, Y, X with a 2x2x2 transposed convolution."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose3d(c_in, c_out, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
