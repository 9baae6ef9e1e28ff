"""Refilling the missing wedge of the training volumes with the model's own predictions.

DeepDeWedge's idea: as training goes on, the inputs' missing wedges are filled with what
the current network predicts there, while the measured region stays the data. Inputs
then carry more information into the rotated frame, and the network learns to refine
its own fill. The refilled volumes live in memory (one float32 copy per training
volume); measured frequencies are never changed.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from cryowae.inference.restore import restore_array
from cryowae.physics.wedge import wedge_mask


def refill_volume(model: torch.nn.Module, data: Any, stats: tuple[float, float],
                  tilt_min: float, tilt_max: float, tilt_axis: str, tile: int,
                  device: torch.device) -> np.ndarray:
    """`data` (Z, Y, X) with its missing wedge replaced by the model's prediction.

    Returns float32 in the intensity units of `data`.
    """
    was_training = model.training
    model.eval()
    try:
        pred = restore_array(SimpleNamespace(model=model, device=device), data, tile=tile,
                             overlap=max(tile // 4, 8), norm=stats)
    finally:
        model.train(was_training)
    x = torch.from_numpy(np.asarray(data, dtype=np.float32))
    m = wedge_mask(x.shape, tilt_min, tilt_max, tilt_axis, rfft=True)
    spec = m * torch.fft.rfftn(x) + (1 - m) * torch.fft.rfftn(torch.from_numpy(pred))
    return torch.fft.irfftn(spec, s=x.shape).numpy().astype(np.float32)
