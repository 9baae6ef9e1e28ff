"""Crowded, cell-like phantoms: macromolecules, a lipid vesicle and a filament.

Volumes are (Z, Y, X) float32 in volts: the electrostatic-potential *contrast* against
vitreous ice (ice is 0, protein about +2.6 V, lipid tails slightly negative). Lengths
are in Angstrom unless a name says voxels; voxel ``i`` has its centre at
``i * voxel_size``. Everything is kept inside the volume (a slab of Z voxels) with a
margin of one voxel, plus `empty_planes` planes at each Z face left free of objects
(empty ice: what a reconstruction thicker than its specimen holds there), and no two
objects overlap (bounding spheres, plus the
filament's cylinder, are kept apart by a gap of at least 1 nm).

Scene contents, placed in this order (random sequential placement):

1. a lipid vesicle (`cryowae.simulation.shapes.add_vesicle`);
2. a filament crossing the field of view, clear of the vesicle
   (`cryowae.simulation.shapes.filament_beads`);
3. particles: copies of a few species (`cryowae.simulation.species`) at random
   positions and orientations, the largest first.

Randomness comes only from the `numpy.random.Generator` passed in, so a seed fixes the
scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.physics.rotation import random_rotations
from cryowae.simulation.shapes import (
    FILAMENTS,
    NM,
    PROTEIN_CONTRAST,
    add_vesicle,
    filament_beads,
    union_of_spheres,
)
from cryowae.simulation.species import Species, procedural_species


def _point_segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances of points p (n, 3) to the segment a-b."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-12), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[:, None] * ab), axis=1)


@dataclass
class Scene:
    """A phantom: `volume` (Z, Y, X) float32 volts and a summary of what is in it."""

    volume: torch.Tensor
    info: dict[str, Any]


class _Obstacles:
    """Spheres and capsules (voxel units) that new objects must keep clear of."""

    def __init__(self) -> None:
        self.centers = np.zeros((0, 3))
        self.radii = np.zeros(0)
        self.segments: list[tuple[np.ndarray, np.ndarray, float]] = []

    def free(self, cand: np.ndarray, r: float) -> np.ndarray:
        ok = np.ones(len(cand), dtype=bool)
        if len(self.radii):
            d = np.linalg.norm(cand[:, None, :] - self.centers[None], axis=-1)
            ok &= (d >= self.radii[None] + r).all(1)
        for a, b, rs in self.segments:
            ok &= _point_segment_distance(cand, a, b) >= rs + r
        return ok

    def add_sphere(self, c: np.ndarray, r: float) -> None:
        self.centers = np.vstack([self.centers, c[None]])
        self.radii = np.append(self.radii, r)


class _Slab:
    """The volume being filled, its obstacles and the placement constants."""

    def __init__(self, shape: Sequence[int], voxel_size: float, empty_planes: int = 0
                 ) -> None:
        zdim, ydim, xdim = (int(s) for s in shape)
        self.vs = float(voxel_size)
        self.vol = torch.zeros(zdim, ydim, xdim, dtype=torch.float32)
        self.dims = np.array([zdim, ydim, xdim], dtype=float)
        # voxels kept empty at each face: one, and the empty planes at the Z faces
        self.margin = np.array([1.0 + empty_planes, 1.0, 1.0])
        self.inner = self.dims - 2 * self.margin  # where objects go
        self.gap = max(1 * NM, 0.5 * self.vs) / self.vs  # voxels between objects
        self.obst = _Obstacles()

    def room(self, r_vox: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Bounds (voxels) of the centres of a sphere of radius `r_vox` kept inside the
        slab with the margin, or None when it does not fit."""
        lo = r_vox + self.margin
        hi = self.dims - 1 - r_vox - self.margin
        return None if bool((hi < lo).any()) else (lo, hi)


def _place_vesicle(slab: _Slab, rng: np.random.Generator) -> dict[str, Any] | None:
    """Add a vesicle (bilayer mid-plane radius R, outer edge R + 3.5 nm) if one fits."""
    vs, dims = slab.vs, slab.dims
    r_max = (float(min(dims / 2 - slab.margin)) * vs - 3.5 * NM) * 0.95
    if r_max < 10 * NM:
        return None
    for _ in range(200):
        radius = rng.uniform(min(15 * NM, r_max), min(35 * NM, r_max))
        r_out = (radius + 3.5 * NM) / vs
        lo, hi = slab.room(r_out)  # type: ignore[misc]
        cand = rng.uniform(lo, hi)[None]
        if slab.obst.free(cand, r_out + slab.gap)[0]:
            add_vesicle(slab.vol, torch.as_tensor(cand[0], dtype=torch.float32), radius, vs)
            slab.obst.add_sphere(cand[0], r_out)
            return {"center_zyx": cand[0].round(2).tolist(),
                    "radius_nm": round(radius / NM, 2), "bilayer": "headgroups 4 nm apart"}
    return None


def _place_filament(slab: _Slab, rng: np.random.Generator) -> dict[str, Any] | None:
    """Add a filament lying nearly flat across the field of view, clear of what is
    there, if one fits (at most a third of the slab's thickness)."""
    vs, dims = slab.vs, slab.dims
    ydim, xdim = (int(d) for d in dims[1:])
    kinds = [k for k, r in FILAMENTS.items()
             if slab.room(r / vs) is not None and 6 * r <= (slab.inner[0] + 2) * vs]
    if not kinds:
        return None
    kind = kinds[-1] if len(kinds) > 1 and rng.random() < 0.5 else kinds[0]
    r_f = FILAMENTS[kind] / vs
    lo, hi = slab.room(r_f)  # type: ignore[misc]
    half_len = 0.5 * math.hypot(ydim, xdim) + r_f + 2
    obst = slab.obst
    for _ in range(100):
        zc = rng.uniform(lo[0], hi[0])
        yc, xc = (rng.uniform(d * 0.25, d * 0.75) for d in dims[1:])
        phi = rng.uniform(0, np.pi)
        slack = min(zc - lo[0], hi[0] - zc)
        dz = rng.uniform(-1, 1) * min(slack / half_len, 0.05)  # lies nearly flat
        d = np.array([dz, np.sin(phi), np.cos(phi)])
        d /= np.linalg.norm(d)
        c = np.array([zc, yc, xc])
        a, b = c - half_len * d, c + half_len * d
        if not len(obst.radii) or bool((_point_segment_distance(
                obst.centers, a, b) >= obst.radii + r_f + slab.gap).all()):
            break
    else:
        return None
    beads, r_bead = filament_beads(kind, 2 * half_len * vs)
    # frame: first axis along d
    e1 = d
    e2 = np.cross(e1, [1.0, 0.0, 0.0])
    if np.linalg.norm(e2) < 1e-6:
        e2 = np.cross(e1, [0.0, 1.0, 0.0])
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    ang = rng.uniform(0, 2 * np.pi)  # phase of the helix about its axis
    cs_, sn = math.cos(ang), math.sin(ang)
    beads = beads @ np.array([[1, 0, 0], [0, cs_, -sn], [0, sn, cs_]]).T
    world = c[None] + (beads[:, :1] * e1 + beads[:, 1:2] * e2 + beads[:, 2:] * e3) / vs
    slab.vol += union_of_spheres(slab.vol.shape, torch.as_tensor(world, dtype=torch.float32),
                                 r_bead, vs, PROTEIN_CONTRAST)
    obst.segments.append((a, b, r_f + slab.gap))
    return {"kind": kind, "axis_start_zyx": a.round(2).tolist(),
            "axis_end_zyx": b.round(2).tolist(),
            "diameter_nm": round(2 * FILAMENTS[kind] / NM, 1)}


def _place_particles(slab: _Slab, rng: np.random.Generator, gen: torch.Generator,
                     species: Sequence[Species], crowding: float, info: dict[str, Any],
                     progress) -> None:
    """Place copies of `species` until `crowding` of the slab is planned (or no room is
    left); fills ``info`` with species copies, particles and the volume fraction."""
    vs, dims = slab.vs, slab.dims
    fits = [s for s in species if slab.room(s.radius / vs) is not None]
    index = {id(s): k for k, s in enumerate(species)}
    info["species"] = [{"name": s.name, "kind": s.kind,
                        "diameter_nm": round(2 * s.radius / NM, 2), "copies": 0}
                       for s in species]
    particles: list[dict[str, Any]] = []
    occupied = 0.0
    if fits:
        # abundances: random, but small species commoner (as in a cytoplasm)
        radii = np.array([s.radius for s in fits])
        weights = rng.dirichlet(np.full(len(fits), 2.0)) * (radii.min() / radii) ** 1.5
        weights /= weights.sum()
        slab_volume = float(np.prod(slab.inner)) * vs**3
        target = crowding * slab_volume
        todo: list[int] = []
        planned = 0.0
        while planned < target and len(todo) < 5000:
            i = int(rng.choice(len(fits), p=weights))
            todo.append(i)
            planned += 4 / 3 * math.pi * fits[i].radius ** 3
        todo.sort(key=lambda i: -fits[i].radius)  # big ones first: denser packing
        rots = random_rotations(len(todo), generator=gen)
        if progress is not None:
            progress.start(len(todo), "placing particles")
        for n, i in enumerate(todo):
            sp = fits[i]
            r_vox = sp.radius / vs
            lo, hi = slab.room(r_vox)  # type: ignore[misc]
            placed = None
            for _ in range(3):
                cand = rng.uniform(lo, hi, size=(48, 3))
                ok = np.flatnonzero(slab.obst.free(cand, r_vox + slab.gap))
                if len(ok):
                    placed = cand[ok[0]]
                    break
            if placed is not None:
                sp.add_to(slab.vol, rots[n], torch.as_tensor(placed, dtype=torch.float32), vs)
                slab.obst.add_sphere(placed, r_vox)
                occupied += 4 / 3 * math.pi * sp.radius**3
                particles.append({"species": sp.name, "center_zyx": placed.round(3).tolist(),
                                  "rotation_zyx": rots[n].numpy().round(5).tolist()})
                info["species"][index[id(sp)]]["copies"] += 1
            if progress is not None:
                progress.check_cancelled("simulation")
                progress.advance(1)
    info["particles"] = particles
    info["n_particles"] = len(particles)
    info["particle_volume_fraction"] = round(
        occupied / (float(np.prod(dims)) * vs**3), 4)


def make_scene(shape: Sequence[int], voxel_size: float, rng: np.random.Generator,
               species: Sequence[Species] | None = None, n_species: int = 6,
               crowding: float = 0.3, vesicle: bool = True, filament: bool = True,
               progress=None, empty_planes: int = 0) -> Scene:
    """Build a crowded phantom.

    Parameters
    ----------
    shape
        (Z, Y, X) in voxels; Z is the slab thickness.
    voxel_size
        Angstrom per voxel.
    rng
        The only source of randomness.
    species
        Particle species to place (e.g. `AtomicSpecies` from PDB files); default:
        `n_species` procedural ones.
    crowding
        Target volume fraction of the slab filled by particles' bounding spheres
        (random sequential placement stops earlier when no room is left).
    vesicle, filament
        Whether to add a vesicle and a filament (skipped when the slab is too thin).
    progress
        Optional `ProgressReporter`, advanced once per placed particle.
    empty_planes
        Planes at each Z face left free of objects (the specimen is the slab between).

    Returns
    -------
    Scene
        The volume (volts, contrast against ice) and ``info``: species (name, kind,
        diameter_nm, copies), particles (species, centre in voxels, rotation),
        vesicle and filament parameters, volume fraction of particles.
    """
    slab = _Slab(shape, voxel_size, empty_planes)
    info: dict[str, Any] = {"units": "volts (potential contrast against vitreous ice)"}
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    info["vesicle"] = _place_vesicle(slab, rng) if vesicle else None
    info["filament"] = _place_filament(slab, rng) if filament else None
    if species is None:
        # particles at most half the slab thick, so that many fit
        species = procedural_species(rng, n_species,
                                     max_diameter=(slab.inner[0] + 2) * slab.vs / 2)
    _place_particles(slab, rng, gen, species, crowding, info, progress)
    return Scene(volume=slab.vol, info=info)
