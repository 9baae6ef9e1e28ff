"""Simulated cryo-electron tomograms with their ground truth.

Pipeline (`simulate_tomogram`), all float32 torch, deterministic per seed:

1. scene: a crowded phantom (`cryowae.simulation.phantom.make_scene`) in volts of
   potential contrast against ice - the ground truth ``gt`` (no noise, no missing
   wedge, no CTF). Particles come from atomic models (`--pdb`) or procedural shapes.
2. tilt series (`cryowae.simulation.tilt_series.record_tilt_series`): projections about
   the tilt axis at ``tilt_min, tilt_min + step, ... <= tilt_max`` degrees (or the
   angles of a tilt file), CTF, inelastic attenuation and counting noise.
3. reconstruction (`cryowae.simulation.tilt_series.reconstruct_halves`): CTF phase
   flipping and weighted back-projection of the even- and the odd-indexed tilts;
   ``tomo`` is the mean of the two halves. Other acquisition and reconstruction
   pipelines (Fourier insertion, apodized and SIRT-like filters, raw CTF, frame halves,
   2x binning, dose weighting) are named in `cryowae.simulation.pipelines`.

So ``tomo`` is in the units of ``gt`` (volts): in the measured region of Fourier space it
equals ``gt`` filtered by ``|CTF|``, plus noise; the missing wedge is empty.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.simulation.config import SimulationConfig
from cryowae.simulation.pipelines import PipelineSettings

#: files written by `write_simulation`
OUTPUT_FILES = ("tomo.mrc", "tomo_even.mrc", "tomo_odd.mrc", "gt.mrc", "tilt_series.mrc",
                "tilts.tlt", "meta.json")


def _seeds(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent generators for the scene (numpy) and the noise (torch)."""
    scene_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(2)
    noise = torch.Generator().manual_seed(int(noise_ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(scene_ss), noise


def _species(config: SimulationConfig) -> list | None:
    """Atomic species from the config's PDB files (None: procedural ones); raises
    `CryowaeInputError` for a model too large for the slab."""
    from cryowae.simulation.potential import read_atomic_model
    from cryowae.simulation.species import AtomicSpecies

    if not config.pdb:
        return None
    species = [AtomicSpecies(read_atomic_model(p)) for p in config.pdb]
    vs = float(config.voxel_size)
    slab_nm = (config.shape[0] - 2 * int(config.empty_planes)) * vs / 10
    for sp in species:
        d_nm = 2 * sp.radius / 10
        if d_nm > slab_nm - 2 * vs / 10:
            raise CryowaeInputError(
                f"--pdb {sp.name}: the model is {d_nm:.1f} nm across and does not fit "
                f"in the {slab_nm:.1f} nm slab; raise --thickness or --voxel-size")
    return species


def simulate_tomogram(config: SimulationConfig, progress: ProgressReporter | None = None,
                      info: dict[str, Any] | None = None,
                      pipeline: PipelineSettings | None = None) -> dict[str, torch.Tensor]:
    """Simulate a tilt series and its reconstructions (see the module docstring).

    Parameters
    ----------
    config
        The simulation settings; validated first.
    progress
        Optional reporter for the scene, projection and reconstruction loops (a cancel
        request raises `cryowae.progress.Cancelled`).
    info
        Optional dict, filled with a summary of the scene (species, particles, vesicle,
        filament) and of the imaging (electrons per pixel, transmission per tilt...).
    pipeline
        The acquisition and reconstruction pipeline
        (`cryowae.simulation.pipelines.PipelineSettings`); None: the default ``wbp``.

    Returns
    -------
    dict
        ``gt``, ``tomo``, ``tomo_even``, ``tomo_odd``: (Z, Y, X) float32 volumes in volts;
        ``tilt_series``: (T, Y, X) float32 recorded images as contrast
        ``1 - counts / expected counts`` (before CTF correction);
        ``angles``: (T,) float32 tilt angles in degrees, ascending.
    """
    from cryowae.simulation.phantom import make_scene
    from cryowae.simulation.pipelines import DEFAULT, run_pipeline, scene_config

    config.validate()
    pipeline = DEFAULT if pipeline is None else pipeline
    grid = scene_config(config, pipeline)
    grid.validate()
    prog = ensure_progress(progress)
    info = {} if info is None else info
    rng, noise_gen = _seeds(config.seed)
    scene = make_scene(grid.shape, float(grid.voxel_size), rng, species=_species(grid),
                       n_species=grid.n_species, crowding=grid.crowding,
                       vesicle=grid.vesicle, filament=grid.filament, progress=prog,
                       empty_planes=int(grid.empty_planes))
    info.update(scene.info)
    res, imaging = run_pipeline(scene.volume, config, pipeline, noise_gen, progress=prog)
    prog.finish()
    info.update(imaging)
    info.update({"gt_std_V": float(res["gt"].std()), "tomo_std_V": float(res["tomo"].std())})
    return res


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise `CryowaeInputError` if OUT_DIR is a file, or a non-empty folder while
    `overwrite` is off. Creates nothing."""
    p = Path(out_dir)
    if p.exists() or p.is_symlink():
        if not p.is_dir():
            raise CryowaeInputError(f"output {p} exists and is not a folder")
        if not overwrite and any(p.iterdir()):
            raise CryowaeInputError(f"output folder {p} exists and is not empty; pass "
                                    "--overwrite to replace it")
    return p


def write_simulation(out_dir: str | os.PathLike, config: SimulationConfig, *,
                     overwrite: bool = False, progress: ProgressReporter | None = None,
                     pipeline: PipelineSettings | None = None) -> Path:
    """Simulate and write OUT_DIR atomically: tomo.mrc, tomo_even.mrc, tomo_odd.mrc,
    gt.mrc, tilt_series.mrc (voxel size in every header), tilts.tlt and meta.json.

    Everything is written to a temporary sibling folder that is renamed to OUT_DIR at
    the end, so OUT_DIR is never half-written. An existing non-empty OUT_DIR is refused
    unless `overwrite`. `pipeline` (default ``wbp``) is recorded in meta.json under
    ``pipeline``. Returns OUT_DIR.
    """
    from cryowae import __version__
    from cryowae.io import atomic_path, write_mrc, write_tilt_angles
    from cryowae.simulation.pipelines import DEFAULT, file_notes

    config.validate()
    pipeline = DEFAULT if pipeline is None else pipeline
    out = check_output_dir(out_dir, overwrite)
    info: dict[str, Any] = {}
    res = simulate_tomogram(config, progress=progress, info=info, pipeline=pipeline)
    vs = float(config.voxel_size)
    angles = res["angles"].numpy().astype(np.float64)
    meta = {
        "cryowae_version": __version__,
        "command": "simulate",
        "seed": int(config.seed),
        "config": config.to_dict(),
        "shape_zyx": list(config.shape),
        "voxel_size_A": vs,
        "tilt_axis": config.geometry.axis,
        "tilt_angles_deg": [round(float(a), 4) for a in angles],
        "pipeline": pipeline.to_dict(),
        "files": {
            "gt.mrc": "ground truth: potential contrast against ice (V); no noise, no "
                      "missing wedge, no CTF",
            **file_notes(pipeline),
            "tilt_series.mrc": "recorded images (T, Y, X) as contrast 1 - counts / "
                               "expected counts, before CTF correction",
            "tilts.tlt": "tilt angles in degrees, one per line, in the order of "
                         "tilt_series.mrc",
        },
        "conventions": "arrays (Z, Y, X); for tilt axis Y the image at tilt theta samples "
                       "the Fourier plane containing ky and (kz, kx) = (sin, cos) theta; "
                       "for X, kx and (kz, ky) (cryowae.physics.wedge)",
        "scene": {k: v for k, v in info.items() if k in (
            "units", "species", "particles", "n_particles", "particle_volume_fraction",
            "vesicle", "filament")},
        "imaging": {k: v for k, v in info.items() if k not in (
            "units", "species", "particles", "n_particles", "particle_volume_fraction",
            "vesicle", "filament")},
    }
    with atomic_path(out, overwrite=True) as tmp:
        tmp.mkdir(parents=True)
        for name in ("tomo", "tomo_even", "tomo_odd", "gt", "tilt_series"):
            write_mrc(tmp / f"{name}.mrc", res[name].numpy(), vs)
        write_tilt_angles(tmp / "tilts.tlt", angles)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out

