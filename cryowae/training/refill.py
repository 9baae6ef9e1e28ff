"""Refilling the missing wedge of the training volumes with the model's own predictions.

DeepDeWedge's idea: as training goes on, the inputs' missing wedges are filled with what
the current network predicts there, while the measured region stays the data. Inputs
then carry more information into the rotated frame, and the network learns to refine
its own fill. The refilled volumes live in memory (one float32 copy per training
volume); measured frequencies are never changed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cryowae.models.protocol import ModelOnDevice
from cryowae.physics.wedge import wedge_mask
from cryowae.tiling.engine import array_sink, model_tile_fn, run_tiles
from cryowae.tiling.settings import TileSettings


def refill_volume(model: torch.nn.Module, data: Any, stats: tuple[float, float],
                  tilt_min: float, tilt_max: float, tilt_axis: str, tile: int,
                  device: torch.device) -> np.ndarray:
    """`data` (Z, Y, X) with its missing wedge replaced by the model's prediction.

    The prediction is a tiled pass of the tile engine (tiles of `tile` voxels, overlap
    ``max(tile // 4, 8)``, normalised with `stats` = (mean, std)) with the model in eval
    mode. Returns float32 in the intensity units of `data`.
    """
    settings = TileSettings(tile=tile, overlap=max(tile // 4, 8))
    plan = settings.plan(data.shape, int(getattr(model, "multiple", 1) or 1))
    pred = np.zeros(plan.shape, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        run_tiles(model_tile_fn(ModelOnDevice(model, device)), data, plan, array_sink(pred),
                  norm=stats, device=device, batch_size=settings.batch_size)
    finally:
        model.train(was_training)
    x = torch.from_numpy(np.asarray(data, dtype=np.float32))
    m = wedge_mask(x.shape, tilt_min, tilt_max, tilt_axis, rfft=True)
    spec = m * torch.fft.rfftn(x) + (1 - m) * torch.fft.rfftn(torch.from_numpy(pred))
    return torch.fft.irfftn(spec, s=x.shape).numpy().astype(np.float32)
