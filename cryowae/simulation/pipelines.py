"""Named acquisition and reconstruction pipelines of the simulator (`cryowae simulate
--pipeline NAME`): one scene and tilt series, reconstructed the ways labs do.

A pipeline is a frozen, validated `PipelineSettings`; `PIPELINES` maps names to them and
`get_pipeline` looks one up. Every pipeline of a seed images the same scene
(`cryowae.simulation.phantom.make_scene`) with the same noise generator, so pipelines
that differ only in reconstruction (``wbp``, ``wbp-hamming``, ``wbp-cosine``,
``sirt-like``, ``fourier``, ``fourier-floor1``, ``wbp-rawctf``) reconstruct the very same
recorded tilt series. Steps (`run_pipeline`):

1. scene on the target grid, or for ``binning`` on a grid of half the voxel size and
   twice the voxels along every axis (the scene's objects are placed in Angstrom, so
   it is the same kind of scene, drawn again);
2. tilt series (`cryowae.simulation.tilt_series.record_tilt_series`), with
   ``radiation_damage`` each tilt's phase image damaged by the exposure filter for a
   dose-symmetric order, with ``halves="frames"`` each tilt's dose counted as two
   independent half-dose frames;
3. binning of the recorded images (and of the ground truth, in 3D, the same way) to the
   target grid, by mean pooling or Fourier cropping (`reconstruct.bin2`);
4. CTF phase flipping (``ctf_correction="flip"``) or none (the raw CTF stays in the
   tomogram);
5. ``dose_weighting``: each image filtered by its exposure filter (not renormalised
   across tilts, as IMOD's mtffilter does);
6. reconstruction: weighted back-projection with a ramp filter times an apodization
   (`reconstruct.wbp_filter`: ramp, hamming, cosine, SIRT-like) or direct Fourier
   insertion with division by the regularised sampling weights
   (`reconstruct.fourier_insertion`);
7. halves: even- and odd-indexed tilts (``tilts``), or the two frame halves of every
   tilt (``frames``). ``tomo`` is the mean of the halves where that equals the
   reconstruction of all the data (WBP of evenly spaced tilts; any reconstruction of
   frame halves, which share their tilts), else (Fourier insertion of tilt halves) the
   reconstruction of all tilts.

The default pipeline ``wbp`` runs the default simulator's own code, bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter
from cryowae.simulation.config import SimulationConfig
from cryowae.simulation.reconstruct import (
    BIN_METHODS,
    WBP_FILTERS,
    InsertionSettings,
    bin2,
    exposure_filter,
    exposures,
    fourier_insertion,
    wbp_filter,
)

RECONSTRUCTIONS = ("wbp", "fourier")
CTF_CORRECTIONS = ("flip", "none")
HALVES = ("tilts", "frames")
BINNINGS = ("none", *BIN_METHODS)


@dataclass(frozen=True)
class PipelineSettings:
    """One acquisition + reconstruction pipeline (validated when made).

    Attributes
    ----------
    name, summary
        Registry name and one line saying what it does.
    reconstruction
        ``wbp`` (weighted back-projection) or ``fourier`` (direct Fourier insertion).
    wbp_filter, sirt_iterations
        WBP only: ``ramp``, ``hamming``, ``cosine`` or ``sirt`` (SIRT-like, N iterations).
    insertion
        Fourier insertion only: `InsertionSettings` (padding, weight floor).
    ctf_correction
        ``flip`` (phase flipping) or ``none`` (the raw CTF).
    halves
        ``tilts`` (even/odd-indexed tilts) or ``frames`` (each tilt's dose split in two).
    binning
        ``none``, or ``mean`` / ``fourier``: simulate at half the voxel size and bin the
        images (and the ground truth) 2x to the target grid.
    radiation_damage, dose_weighting
        Damage each tilt's signal by its exposure (acquisition); filter each image by
        its exposure filter (reconstruction).
    """

    name: str
    summary: str
    reconstruction: str = "wbp"
    wbp_filter: str = "ramp"
    sirt_iterations: int = 10
    insertion: InsertionSettings = field(default_factory=InsertionSettings)
    ctf_correction: str = "flip"
    halves: str = "tilts"
    binning: str = "none"
    radiation_damage: bool = False
    dose_weighting: bool = False

    def __post_init__(self) -> None:
        for value, allowed, what in (
                (self.reconstruction, RECONSTRUCTIONS, "reconstruction"),
                (self.wbp_filter, WBP_FILTERS, "WBP filter"),
                (self.ctf_correction, CTF_CORRECTIONS, "CTF correction"),
                (self.halves, HALVES, "halves"), (self.binning, BINNINGS, "binning")):
            if value not in allowed:
                raise CryowaeInputError(f"pipeline {self.name}: unknown {what} {value!r}; "
                                        f"known: {', '.join(allowed)}")
        if int(self.sirt_iterations) < 1:
            raise CryowaeInputError(f"pipeline {self.name}: SIRT-like iterations must be "
                                    f">= 1, got {self.sirt_iterations}")
        if self.reconstruction == "fourier" and self.wbp_filter != "ramp":
            raise CryowaeInputError(f"pipeline {self.name}: a WBP filter needs "
                                    "reconstruction 'wbp'")

    @property
    def is_default(self) -> bool:
        """Whether this runs the default simulator (WBP ramp, phase flip, tilt halves,
        no binning, no damage or dose weighting)."""
        return _settings(self) == _settings(DEFAULT)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for meta.json."""
        return dataclasses.asdict(self)


def _settings(p: PipelineSettings) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    del d["name"]
    del d["summary"]
    return d


DEFAULT = PipelineSettings(
    "wbp", "weighted back-projection, ramp filter, CTF phase-flipped, halves by tilts "
    "(the default simulator)")

PIPELINES: dict[str, PipelineSettings] = {p.name: p for p in (
    DEFAULT,
    PipelineSettings("wbp-hamming", "WBP, ramp times a Hamming window (0.08 at Nyquist)",
                     wbp_filter="hamming"),
    PipelineSettings("wbp-cosine", "WBP, ramp times a cosine window (0 at Nyquist)",
                     wbp_filter="cosine"),
    PipelineSettings("sirt-like", "WBP with the SIRT-like filter of 10 iterations",
                     wbp_filter="sirt", sirt_iterations=10),
    PipelineSettings("fourier", "direct Fourier insertion, divided by the sampling "
                     "weights (floor 0.1)", reconstruction="fourier"),
    PipelineSettings("fourier-floor1", "direct Fourier insertion, sampling weights "
                     "clamped at 1 (torch-fourier-slice's backproject_2d_to_3d)",
                     reconstruction="fourier", insertion=InsertionSettings(weight_floor=1.0)),
    PipelineSettings("wbp-rawctf", "WBP ramp, CTF left uncorrected", ctf_correction="none"),
    PipelineSettings("wbp-frames", "WBP ramp, halves by frames (each tilt's dose split "
                     "in two)", halves="frames"),
    PipelineSettings("wbp-bin2-mean", "WBP ramp of images simulated at half the voxel "
                     "size and 2x mean-pooled", binning="mean"),
    PipelineSettings("wbp-bin2-fourier", "WBP ramp of images simulated at half the voxel "
                     "size and 2x Fourier-cropped", binning="fourier"),
    PipelineSettings("wbp-damage", "WBP ramp, radiation damage, no dose weighting",
                     radiation_damage=True),
    PipelineSettings("wbp-dose", "WBP ramp, radiation damage and dose weighting",
                     radiation_damage=True, dose_weighting=True),
    PipelineSettings("fourier-lab", "Fourier insertion of 2x Fourier-cropped images, "
                     "damage and dose weighting, halves by frames", reconstruction="fourier",
                     binning="fourier", radiation_damage=True, dose_weighting=True,
                     halves="frames"),
)}


def get_pipeline(name: str) -> PipelineSettings:
    """The registered pipeline `name`; `CryowaeInputError` naming the known ones."""
    if name not in PIPELINES:
        raise CryowaeInputError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}")
    return PIPELINES[name]


def pipeline_table() -> str:
    """One line per registered pipeline: name and summary."""
    width = max(len(n) for n in PIPELINES)
    return "\n".join(f"{n:<{width}}  {p.summary}" for n, p in PIPELINES.items())


def scene_config(config: SimulationConfig, pipeline: PipelineSettings) -> SimulationConfig:
    """The config of the grid the scene and the tilt series are simulated on: `config`
    itself, or for a binned pipeline half the voxel size and twice the voxels."""
    if pipeline.binning == "none":
        return config
    z, y, _ = config.shape
    return dataclasses.replace(config, size=2 * y, thickness=2 * z,
                               empty_planes=2 * int(config.empty_planes),
                               voxel_size=float(config.voxel_size) / 2)


def file_notes(pipeline: PipelineSettings) -> dict[str, str]:
    """meta.json's descriptions of tomo.mrc and the halves under `pipeline`."""
    if pipeline.is_default:
        return {"tomo.mrc": "weighted back-projection of all tilts, CTF phase-flipped (V)",
                "tomo_even.mrc": "reconstruction from the even-indexed tilts (V)",
                "tomo_odd.mrc": "reconstruction from the odd-indexed tilts (V)"}
    if pipeline.halves == "frames":
        even, odd = "the first dose half of every tilt", "the second dose half of every tilt"
    else:
        even, odd = "the even-indexed tilts", "the odd-indexed tilts"
    return {"tomo.mrc": f"pipeline {pipeline.name}: {pipeline.summary} (V)",
            "tomo_even.mrc": f"reconstruction from {even} (V)",
            "tomo_odd.mrc": f"reconstruction from {odd} (V)"}


def _reconstructor(pipeline: PipelineSettings, shape_y: tuple[int, int, int],
                   progress: ProgressReporter | None):
    """(images (T, Y, X) in the tilt-axis-Y frame, angles) -> (Z, Y, X) volume."""
    from cryowae.simulation.projection import tilt_weights, weighted_backprojection

    if pipeline.reconstruction == "fourier":
        return lambda im, a: fourier_insertion(im, a, shape_y, pipeline.insertion, progress)
    radial = wbp_filter(pipeline.wbp_filter, pipeline.sirt_iterations)
    return lambda im, a: weighted_backprojection(im, a, shape_y, tilt_weights(a),
                                                 progress=progress, radial=radial)


def run_pipeline(gt: torch.Tensor, config: SimulationConfig, pipeline: PipelineSettings,
                 noise_gen: torch.Generator, progress: ProgressReporter | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Record and reconstruct the scene `gt` (on `scene_config(config, pipeline)`'s
    grid, volts) under `pipeline` (see the module docstring).

    Returns
    -------
    arrays, info
        ``gt`` (on the target grid), ``tomo``, ``tomo_even``, ``tomo_odd`` ((Z, Y, X)
        float32, volts), ``tilt_series`` ((T, Y, X) recorded contrast on the target
        pixel), ``angles``; and the imaging summary for meta.json.
    """
    from cryowae.physics.ctf import interaction_constant, phase_flip
    from cryowae.simulation.tilt_series import _to_y, reconstruct_halves, record_tilt_series

    fine = scene_config(config, pipeline)
    if pipeline.is_default:
        series = record_tilt_series(gt, config, noise_gen, progress=progress)
        even, odd, halves_info = reconstruct_halves(series, config, progress=progress)
        arrays = {"gt": gt, "tomo": 0.5 * (even + odd), "tomo_even": even, "tomo_odd": odd,
                  "tilt_series": series.recorded, "angles": series.angles}
        return arrays, {**series.info, **halves_info}

    angles64 = torch.as_tensor(config.tilt_angles(), dtype=torch.float64)
    n_tilts = int(angles64.numel())
    exposure = exposures(angles64, config.dose / n_tilts)
    series = record_tilt_series(gt, fine, noise_gen, progress=progress,
                                frames=pipeline.halves == "frames",
                                exposure=exposure if pipeline.radiation_damage else None)
    stacks = [series.recorded, *(series.frames or ())]
    if pipeline.binning != "none":
        stacks = [bin2(s, pipeline.binning, 2) for s in stacks]
        gt = bin2(gt, pipeline.binning, 3)
    vs = float(config.voxel_size)
    axis = config.geometry.axis
    sigma = interaction_constant(config.voltage)

    def projected(images: torch.Tensor) -> torch.Tensor:
        if config.ctf and pipeline.ctf_correction == "flip":
            images = phase_flip(images, vs, series.params)
        if pipeline.dose_weighting:
            images = exposure_filter(images, vs, exposure, config.voltage)
        return _to_y(images / (2.0 * sigma * vs), axis)

    shape = config.shape
    shape_y = shape if axis == "y" else (shape[0], shape[2], shape[1])
    rec = _reconstructor(pipeline, shape_y, progress)
    angles = series.angles
    info: dict[str, Any] = {**series.info, "pipeline": pipeline.name}
    if pipeline.halves == "frames":
        jobs = [(projected(stacks[1]), angles), (projected(stacks[2]), angles)]
        info["halves"] = "frames: each tilt's dose split into two independent halves"
    else:
        full = projected(stacks[0])
        even_i, odd_i = torch.arange(0, n_tilts, 2), torch.arange(1, n_tilts, 2)
        jobs = [(full[even_i], angles[even_i]), (full[odd_i], angles[odd_i])]
        if pipeline.reconstruction == "fourier":
            jobs.append((full, angles))
        info.update({"even_tilt_indices": even_i.tolist(), "odd_tilt_indices": odd_i.tolist()})
    if progress is not None:
        progress.start(sum(int(a.numel()) for _, a in jobs), "reconstructing")
    vols = [_to_y(rec(im, a), axis) for im, a in jobs]
    tomo = vols[2] if len(vols) == 3 else 0.5 * (vols[0] + vols[1])
    arrays = {"gt": gt.contiguous(), "tomo": tomo, "tomo_even": vols[0], "tomo_odd": vols[1],
              "tilt_series": stacks[0].to(torch.float32), "angles": angles}
    return arrays, info
