"""What inference, sampling and refill need of a restorer: a network on a device.

`LoadedRestorer` (`cryowae.models.checkpoint`) satisfies `Restorer` and adds what a
checkpoint knows (voxel size, tilt geometry, codes...); `ModelOnDevice` is the bare form
for a network that is still training (refill of the training volumes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Restorer(Protocol):
    """A restorer ready to run: ``model`` maps normalised (B, 1, Z, Y, X) tiles, whose
    sizes are multiples of ``model.multiple``, to ``(restored, z)``, on ``device``."""

    model: nn.Module
    device: torch.device


@dataclass
class ModelOnDevice:
    """The simplest `Restorer`: a network and the device it lives on."""

    model: nn.Module
    device: torch.device = torch.device("cpu")


__all__ = ["ModelOnDevice", "Restorer"]
