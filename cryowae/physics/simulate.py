"""Simulated cryo-electron tomograms with their ground truth.

Pipeline (`simulate_tomogram`), all float32 torch, deterministic per seed:

1. scene: a crowded phantom (`cryowae.physics.phantom.make_scene`) in volts of
   potential contrast against ice - the ground truth ``gt`` (no noise, no missing
   wedge, no CTF). Particles come from atomic models (`--pdb`) or procedural shapes.
2. tilt series: line integrals about Y (`cryowae.physics.projection.project_y`) at
   ``tilt_min, tilt_min + step, ... <= tilt_max`` degrees; phase shift
   ``phi = sigma * voxel_size * projection`` (sigma: `interaction_constant`).
3. imaging: weak-phase image ``1 - 2 (CTF * phi)`` (`cryowae.physics.ctf`), attenuated
   by inelastic scattering in the slab, ``exp(-thickness / (mean_free_path cos theta))``
   (zero-loss, energy-filtered imaging), and Poisson counting noise with
   ``dose / n_tilts * voxel_size^2`` electrons per pixel per tilt.
4. correction and reconstruction: each image is normalised by its expected count,
   CTF-corrected by phase flipping, scaled back to projected potential, and
   reconstructed by weighted back-projection. ``tomo_even`` / ``tomo_odd`` use the
   even- / odd-indexed tilts (their noise is independent); ``tomo`` is their mean,
   which for evenly spaced tilts is exactly the weighted back-projection of all tilts
   (`cryowae.physics.projection.tilt_weights`).

So ``tomo`` is in the units of ``gt`` (volts): in the measured region of Fourier space it
equals ``gt`` filtered by ``|CTF|``, plus noise; the missing wedge is empty.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter, ensure_progress

#: files written by `write_simulation`
OUTPUT_FILES = ("tomo.mrc", "tomo_even.mrc", "tomo_odd.mrc", "gt.mrc", "tilt_series.mrc",
                "tilts.tlt", "meta.json")


def default_thickness(size: int) -> int:
    """Slab thickness (Z voxels) for a `size` x `size` field: 5/8 of it, rounded to a
    multiple of 8 (128 -> 80, 64 -> 40, 48 -> 32), at least 8."""
    return max(8, int(round(size * 5 / 8 / 8)) * 8)


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a simulated tomogram (with the seed, all of it).

    Attributes
    ----------
    size
        Y and X in voxels.
    thickness
        Z in voxels (the slab); None: `default_thickness(size)`.
    voxel_size
        Angstrom per voxel (also the detector pixel size).
    tilt_min, tilt_max, tilt_step
        Tilt range and increment in degrees (tilt axis Y).
    seed
        Seed of every random choice (scene and noise).
    pdb
        Atomic models (PDB / mmCIF paths) to use as particle species; empty:
        procedural species.
    defocus, voltage, cs, amplitude_contrast
        Microscope: defocus in um (positive underfocus), kV, mm, fraction.
    dose
        Total electron dose over the tilt series, e/A^2.
    noise, ctf
        Switch the counting noise / the CTF off (ideal transfer) for tests.
    crowding
        Target volume fraction of the slab taken by particles' bounding spheres.
    n_species
        Number of procedural species.
    vesicle, filament
        Include a vesicle / a filament.
    mean_free_path
        Inelastic mean free path in vitreous ice, A (about 350 nm at 300 kV).
    """

    size: int = 128
    thickness: int | None = None
    voxel_size: float = 8.0
    tilt_min: float = -60.0
    tilt_max: float = 60.0
    tilt_step: float = 3.0
    seed: int = 0
    pdb: tuple[str, ...] = field(default_factory=tuple)
    defocus: float = 3.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    dose: float = 120.0
    noise: bool = True
    ctf: bool = True
    crowding: float = 0.3
    n_species: int = 6
    vesicle: bool = True
    filament: bool = True
    mean_free_path: float = 3500.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) in voxels."""
        z = default_thickness(self.size) if self.thickness is None else int(self.thickness)
        return (z, int(self.size), int(self.size))

    def tilt_angles(self) -> np.ndarray:
        """Tilt angles in degrees: tilt_min, tilt_min + step, ... up to tilt_max."""
        n = int(math.floor((self.tilt_max - self.tilt_min) / self.tilt_step + 1e-6)) + 1
        return self.tilt_min + self.tilt_step * np.arange(n, dtype=np.float64)

    def validate(self) -> None:
        """Raise `CryowaeInputError` for any impossible setting or missing PDB file."""
        from cryowae.physics.wedge import check_tilt_range

        def positive(name: str, value: float) -> None:
            if not (math.isfinite(value) and value > 0):
                raise CryowaeInputError(f"--{name} must be positive, got {value:g}")

        if int(self.size) < 16:
            raise CryowaeInputError(f"--size must be at least 16 voxels, got {self.size}")
        if self.thickness is not None and int(self.thickness) < 8:
            raise CryowaeInputError(f"--thickness must be at least 8 voxels, got "
                                    f"{self.thickness}")
        positive("voxel-size", self.voxel_size)
        check_tilt_range(self.tilt_min, self.tilt_max)
        positive("tilt-step", self.tilt_step)
        if len(self.tilt_angles()) < 2:
            raise CryowaeInputError(
                f"--tilt-step {self.tilt_step:g} leaves fewer than two tilts in "
                f"{self.tilt_min:g}..{self.tilt_max:g}")
        positive("dose", self.dose)
        positive("voltage", self.voltage)
        positive("defocus", self.defocus)
        if not (math.isfinite(self.cs) and self.cs >= 0):
            raise CryowaeInputError(f"--cs must be zero or positive, got {self.cs:g}")
        if not (0 <= self.amplitude_contrast < 1):
            raise CryowaeInputError("--amplitude-contrast must lie in [0, 1), got "
                                    f"{self.amplitude_contrast:g}")
        if not (0 <= self.crowding <= 0.6):
            raise CryowaeInputError(f"crowding must lie in [0, 0.6], got {self.crowding:g}")
        positive("mean-free-path", self.mean_free_path)
        for p in self.pdb:
            path = Path(p)
            if not path.is_file():
                raise CryowaeInputError(f"--pdb {p}: no such file")
            if not os.access(path, os.R_OK):
                raise CryowaeInputError(f"--pdb {p}: not readable (permission denied)")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["pdb"] = [str(p) for p in self.pdb]
        d["thickness"] = self.shape[0]
        return d


def _seeds(seed: int) -> tuple[np.random.Generator, torch.Generator]:
    """Independent generators for the scene (numpy) and the noise (torch)."""
    scene_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(2)
    noise = torch.Generator().manual_seed(int(noise_ss.generate_state(1, np.uint64)[0] >> 1))
    return np.random.default_rng(scene_ss), noise


def simulate_tomogram(config: SimulationConfig, progress: ProgressReporter | None = None,
                      info: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Simulate a tilt series and its reconstructions (see the module docstring).

    Parameters
    ----------
    config
        The simulation settings; validated first.
    progress
        Optional reporter for the scene, projection and reconstruction loops.
    info
        Optional dict, filled with a summary of the scene (species, particles, vesicle,
        filament) and of the imaging (electrons per pixel, transmission per tilt...).

    Returns
    -------
    dict
        ``gt``, ``tomo``, ``tomo_even``, ``tomo_odd``: (Z, Y, X) float32 volumes in volts;
        ``tilt_series``: (T, Y, X) float32 recorded images as contrast
        ``1 - counts / expected counts`` (before CTF correction);
        ``angles``: (T,) float32 tilt angles in degrees.
    """
    from cryowae.physics.ctf import CTFParams, apply_ctf, interaction_constant, phase_flip
    from cryowae.physics.phantom import AtomicSpecies, make_scene
    from cryowae.physics.potential import read_atomic_model
    from cryowae.physics.projection import project_y, tilt_weights, weighted_backprojection

    config.validate()
    prog = ensure_progress(progress)
    info = {} if info is None else info
    shape = config.shape
    vs = float(config.voxel_size)
    rng, noise_gen = _seeds(config.seed)

    species = None
    if config.pdb:
        species = [AtomicSpecies(read_atomic_model(p)) for p in config.pdb]
        slab_nm = shape[0] * vs / 10
        for sp in species:
            d_nm = 2 * sp.radius / 10
            if d_nm > slab_nm - 2 * vs / 10:
                raise CryowaeInputError(
                    f"--pdb {sp.name}: the model is {d_nm:.1f} nm across and does not fit "
                    f"in the {slab_nm:.1f} nm slab; raise --thickness or --voxel-size")
    scene = make_scene(shape, vs, rng, species=species, n_species=config.n_species,
                       crowding=config.crowding, vesicle=config.vesicle,
                       filament=config.filament, progress=prog)
    gt = scene.volume
    info.update(scene.info)

    angles = torch.as_tensor(config.tilt_angles(), dtype=torch.float32)
    n_tilts = int(angles.numel())
    prog.start(n_tilts, "projecting")
    proj = project_y(gt, angles, progress=prog)  # (T, Y, X), volts x voxels

    sigma = interaction_constant(config.voltage)  # rad / (V A)
    phase = proj * (sigma * vs)
    params = CTFParams(config.defocus, config.voltage, config.cs, config.amplitude_contrast)
    contrast = apply_ctf(phase, vs, params) if config.ctf else phase
    intensity = torch.clamp(1.0 - 2.0 * contrast, min=0.0)
    thickness_a = shape[0] * vs
    cos_t = torch.cos(torch.deg2rad(angles.to(torch.float64)))
    transmission = torch.exp(-thickness_a / (config.mean_free_path * cos_t)).to(torch.float32)
    electrons = config.dose / n_tilts * vs**2  # incident electrons per pixel per tilt
    expected = electrons * transmission[:, None, None]
    if config.noise:
        counts = torch.poisson(intensity * expected, generator=noise_gen)
        recorded = 1.0 - counts / expected
    else:
        recorded = 1.0 - intensity
    corrected = phase_flip(recorded, vs, params) if config.ctf else recorded
    est = corrected / (2.0 * sigma * vs)  # back to projected potential, volts x voxels

    even = torch.arange(0, n_tilts, 2)
    odd = torch.arange(1, n_tilts, 2)
    prog.start(n_tilts, "reconstructing")
    halves = []
    for idx in (even, odd):
        a = angles[idx]
        halves.append(weighted_backprojection(est[idx], a, shape, tilt_weights(a),
                                              progress=prog))
    prog.finish()
    tomo_even, tomo_odd = halves
    tomo = 0.5 * (tomo_even + tomo_odd)

    info.update({
        "n_tilts": n_tilts,
        "even_tilt_indices": even.tolist(),
        "odd_tilt_indices": odd.tolist(),
        "dose_per_tilt_e_per_A2": config.dose / n_tilts,
        "incident_electrons_per_pixel_per_tilt": electrons,
        "transmission_per_tilt": [round(float(t), 4) for t in transmission],
        "interaction_constant_rad_per_V_A": sigma,
        "gt_std_V": float(gt.std()),
        "tomo_std_V": float(tomo.std()),
    })
    return {"gt": gt, "tomo": tomo, "tomo_even": tomo_even, "tomo_odd": tomo_odd,
            "tilt_series": recorded.to(torch.float32), "angles": angles}


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
                     overwrite: bool = False, progress: ProgressReporter | None = None
                     ) -> Path:
    """Simulate and write OUT_DIR atomically: tomo.mrc, tomo_even.mrc, tomo_odd.mrc,
    gt.mrc, tilt_series.mrc (voxel size in every header), tilts.tlt and meta.json.

    Everything is written to a temporary sibling folder that is renamed to OUT_DIR at
    the end, so OUT_DIR is never half-written. An existing non-empty OUT_DIR is refused
    unless `overwrite`. Returns OUT_DIR.
    """
    from cryowae import __version__
    from cryowae.io import atomic_path, write_mrc, write_tilt_angles

    config.validate()
    out = check_output_dir(out_dir, overwrite)
    info: dict[str, Any] = {}
    res = simulate_tomogram(config, progress=progress, info=info)
    vs = float(config.voxel_size)
    angles = res["angles"].numpy().astype(np.float64)
    meta = {
        "cryowae_version": __version__,
        "command": "simulate",
        "seed": int(config.seed),
        "config": config.to_dict(),
        "shape_zyx": list(config.shape),
        "voxel_size_A": vs,
        "tilt_axis": "y",
        "tilt_angles_deg": [round(float(a), 4) for a in angles],
        "files": {
            "gt.mrc": "ground truth: potential contrast against ice (V); no noise, no "
                      "missing wedge, no CTF",
            "tomo.mrc": "weighted back-projection of all tilts, CTF phase-flipped (V)",
            "tomo_even.mrc": "reconstruction from the even-indexed tilts (V)",
            "tomo_odd.mrc": "reconstruction from the odd-indexed tilts (V)",
            "tilt_series.mrc": "recorded images (T, Y, X) as contrast 1 - counts / "
                               "expected counts, before CTF correction",
            "tilts.tlt": "tilt angles in degrees, one per line, in the order of "
                         "tilt_series.mrc",
        },
        "conventions": "arrays (Z, Y, X); tilt axis Y; the image at tilt theta samples "
                       "the Fourier plane containing ky and (kz, kx) = (sin, cos) theta "
                       "(cryowae.physics.wedge)",
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

