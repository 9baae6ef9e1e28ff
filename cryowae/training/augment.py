"""On-device augmentation for self-supervised missing-wedge training.

Following the DeepDeWedge/IsoNet idea: input and target subtomograms are rotated by the
same random rotation R, which turns the target's missing wedge to a new orientation.
The input then loses, on top, the missing wedge in the tomogram's own orientation (the
"extra wedge"), so the network sees inputs that look like the tomogram and must predict
target content in a region its input lacks. The loss is taken where the rotated target
was measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.rotation import random_rotations, rotate_volume
from cryowae.physics.wedge import apply_fourier_mask, wedge_mask


@dataclass
class TrainingBatch:
    """One batch on the device. Volumes (B, 1, P, P, P); masks (B, P, P, P//2+1)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor  # real-space mask of voxels that came from real data
    target_measured: torch.Tensor  # where the rotated target was measured (rfft)
    input_measured: torch.Tensor  # the tomogram's own wedge (rfft), same for all items


def make_batch(inputs: list[np.ndarray], targets: list[np.ndarray], patch: int,
               geometry: TiltGeometry, device: torch.device,
               generator: torch.Generator | None = None, rotate: bool = True) -> TrainingBatch:
    """Rotate crops to patches on `device`, apply the extra wedge, and build the masks.

    Parameters
    ----------
    inputs, targets
        Crops (Z, Y, X) of the normalised input and target volumes, large enough to
        hold a rotated `patch`^3 cube.
    patch
        Edge of the output patches, voxels.
    geometry
        Tilt geometry of the tomogram (the wedge of the input, rotated for the target).
    device, generator
        Where the batch is built; the random source of the rotations.
    rotate
        False: identity rotations (the patch is the centre of the crop).
    """
    b = len(inputs)
    rot = random_rotations(b, generator=generator, device=device) if rotate else \
        torch.eye(3, device=device).expand(b, 3, 3).contiguous()
    outs_in, outs_tg, valid = [], [], []
    for i in range(b):
        x = torch.from_numpy(inputs[i]).to(device)[None, None]
        t = torch.from_numpy(targets[i]).to(device)[None, None]
        ones = torch.ones_like(x)
        stacked = torch.cat([x, t, ones], dim=1)
        r = rotate_volume(stacked, rot[i:i + 1], out_shape=(patch, patch, patch))
        outs_in.append(r[:, 0:1])
        outs_tg.append(r[:, 1:2])
        valid.append((r[:, 2:3] > 0.999).float())
    x_rot = torch.cat(outs_in)
    t_rot = torch.cat(outs_tg)
    v = torch.cat(valid)
    shape = (patch, patch, patch)
    lo, hi, axis = geometry.tilt_min, geometry.tilt_max, geometry.axis
    m_in = wedge_mask(shape, lo, hi, axis, rfft=True, device=device)
    m_tg = wedge_mask(shape, lo, hi, axis, rfft=True, rotation=rot, device=device)
    x_in = apply_fourier_mask(x_rot * v, m_in)
    return TrainingBatch(inputs=x_in, targets=t_rot, valid=v, target_measured=m_tg,
                         input_measured=m_in)
