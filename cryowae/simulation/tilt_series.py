"""From a ground-truth potential to a recorded tilt series, and back to tomograms.

`record_tilt_series` images a (Z, Y, X) potential (volts) at each tilt:

1. line integrals about the tilt axis (`cryowae.simulation.projection.project_y`; for
   tilt axis X the volume is transposed to (Z, X, Y), projected about its Y axis and
   the images transposed back, so the wedge is `cryowae.physics.wedge`'s ``"x"`` one);
   phase shift ``phi = sigma * voxel_size * projection`` (sigma:
   `cryowae.physics.ctf.interaction_constant`);
2. weak-phase image ``1 - 2 (CTF * phi)`` (`cryowae.physics.ctf`), attenuated by
   inelastic scattering in the slab, ``exp(-thickness / (mean_free_path cos theta))``
   (zero-loss, energy-filtered imaging), and Poisson counting noise with
   ``dose / n_tilts * voxel_size^2`` electrons per pixel per tilt.

`reconstruct_halves` normalises each image by its expected count, corrects the CTF by
phase flipping, scales back to projected potential and reconstructs the even- and the
odd-indexed tilts apart by weighted back-projection (their noise is independent); the
mean of the two halves is, for evenly spaced tilts, exactly the weighted back-projection
of all tilts (`cryowae.simulation.projection.tilt_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cryowae.physics.ctf import CTFParams, apply_ctf, interaction_constant, phase_flip
from cryowae.progress import ProgressReporter
from cryowae.simulation.config import SimulationConfig
from cryowae.simulation.projection import project_y, tilt_weights, weighted_backprojection


def _to_y(volume: torch.Tensor, axis: str) -> torch.Tensor:
    """(Z, Y, X) -> the frame whose Y is the tilt axis (a transpose for axis X)."""
    return volume if axis == "y" else volume.transpose(-2, -1).contiguous()


@dataclass
class TiltSeries:
    """Recorded images and what reconstruction needs.

    Attributes
    ----------
    angles
        (T,) float32 tilt angles, degrees, ascending.
    recorded
        (T, Y, X) float32 images as contrast ``1 - counts / expected counts`` (before
        CTF correction), tilt axis as in the config.
    params
        The microscope's CTF parameters.
    info
        Imaging summary for meta.json (dose, electrons, transmission per tilt...).
    frames
        With dose-split recording: the two (T, Y, X) half-dose series, each as contrast
        against its own expected count; else None.
    """

    angles: torch.Tensor
    recorded: torch.Tensor
    params: CTFParams
    info: dict[str, Any]
    frames: tuple[torch.Tensor, torch.Tensor] | None = None


def record_tilt_series(gt: torch.Tensor, config: SimulationConfig,
                       noise_gen: torch.Generator,
                       progress: ProgressReporter | None = None, *,
                       frames: bool = False,
                       exposure: torch.Tensor | None = None) -> TiltSeries:
    """Image the potential `gt` (Z, Y, X, volts) at the config's tilts (see the module
    docstring). `noise_gen` draws the counting noise; `progress` is advanced per tilt.

    `frames`: each tilt's dose is counted as two independent halves (two Poisson draws
    of half the expected counts), kept in `TiltSeries.frames`; `recorded` is their sum.
    `exposure`: (T,) e/A^2 received by each tilt; the phase image of each tilt is then
    damaged by the exposure filter (`cryowae.simulation.reconstruct.exposure_filter`)
    before the CTF. Without either, the series is the default simulator's."""
    axis = config.geometry.axis
    vs = float(config.voxel_size)
    angles = torch.as_tensor(config.tilt_angles(), dtype=torch.float32)
    n_tilts = int(angles.numel())
    if progress is not None:
        progress.start(n_tilts, "projecting")
    proj = _to_y(project_y(_to_y(gt, axis), angles, progress=progress), axis)  # V x voxels

    sigma = interaction_constant(config.voltage)  # rad / (V A)
    phase = proj * (sigma * vs)
    if exposure is not None:
        from cryowae.simulation.reconstruct import exposure_filter

        phase = exposure_filter(phase, vs, exposure, config.voltage)
    params = CTFParams(config.defocus, config.voltage, config.cs, config.amplitude_contrast)
    contrast = apply_ctf(phase, vs, params) if config.ctf else phase
    intensity = torch.clamp(1.0 - 2.0 * contrast, min=0.0)
    thickness_a = gt.shape[0] * vs
    cos_t = torch.cos(torch.deg2rad(angles.to(torch.float64)))
    transmission = torch.exp(-thickness_a / (config.mean_free_path * cos_t)).to(torch.float32)
    electrons = config.dose / n_tilts * vs**2  # incident electrons per pixel per tilt
    expected = electrons * transmission[:, None, None]
    halves = None
    if config.noise and frames:
        half = 0.5 * expected
        counts_a = torch.poisson(intensity * half, generator=noise_gen)
        counts_b = torch.poisson(intensity * half, generator=noise_gen)
        recorded = 1.0 - (counts_a + counts_b) / expected
        halves = ((1.0 - counts_a / half).to(torch.float32),
                  (1.0 - counts_b / half).to(torch.float32))
    elif config.noise:
        counts = torch.poisson(intensity * expected, generator=noise_gen)
        recorded = 1.0 - counts / expected
    else:
        recorded = 1.0 - intensity
        if frames:
            halves = (recorded.to(torch.float32), recorded.to(torch.float32))
    info = {
        "n_tilts": n_tilts,
        "dose_per_tilt_e_per_A2": config.dose / n_tilts,
        "incident_electrons_per_pixel_per_tilt": electrons,
        "transmission_per_tilt": [round(float(t), 4) for t in transmission],
        "interaction_constant_rad_per_V_A": sigma,
    }
    if exposure is not None:
        info["exposure_e_per_A2"] = [round(float(e), 3) for e in exposure]
    return TiltSeries(angles, recorded.to(torch.float32), params, info, halves)


def reconstruct_halves(series: TiltSeries, config: SimulationConfig,
                       progress: ProgressReporter | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """CTF-corrected weighted back-projections of the even- and the odd-indexed tilts.

    Returns
    -------
    tomo_even, tomo_odd, info
        Two (Z, Y, X) float32 volumes in volts (the units of the ground truth) and the
        tilt indices of each half.
    """
    axis = config.geometry.axis
    vs = float(config.voxel_size)
    shape = config.shape
    sigma = interaction_constant(config.voltage)
    recorded = series.recorded
    corrected = phase_flip(recorded, vs, series.params) if config.ctf else recorded
    est = _to_y(corrected / (2.0 * sigma * vs), axis)  # projected potential, V x voxels
    shape_y = shape if axis == "y" else (shape[0], shape[2], shape[1])
    n_tilts = int(series.angles.numel())
    even = torch.arange(0, n_tilts, 2)
    odd = torch.arange(1, n_tilts, 2)
    if progress is not None:
        progress.start(n_tilts, "reconstructing")
    halves = []
    for idx in (even, odd):
        a = series.angles[idx]
        rec = weighted_backprojection(est[idx], a, shape_y, tilt_weights(a), progress=progress)
        halves.append(_to_y(rec, axis))
    info = {"even_tilt_indices": even.tolist(), "odd_tilt_indices": odd.tolist()}
    return halves[0], halves[1], info
