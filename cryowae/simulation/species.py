"""Macromolecule species of the phantoms: procedural shapes and atomic models.

A species is something placed many times at random positions and orientations: it has a
name, a kind, a bounding radius (Angstrom) and adds one rotated copy of itself to a
(Z, Y, X) volume in volts of contrast against ice.

* `ProceduralSpecies`: blobby multi-lobe complexes built from rotated ellipsoids, rings
  with bumps, stacked barrels with a channel, bent chains of beads; 8-25 nm across.
  Procedural shapes have a uniform interior density and an edge softened over ~1/3
  voxel (anti-aliased), and each lobe its own density (+-15%), which gives them
  domain-like texture.
* `AtomicSpecies`: an atomic model (`cryowae.simulation.potential`).

Randomness comes only from the `numpy.random.Generator` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from cryowae.physics.rotation import random_rotations
from cryowae.simulation.potential import (
    SOLVENT_CONTRAST,
    AtomicModel,
    add_model_potential,
    peng_parameters,
)
from cryowae.simulation.shapes import NM, PROTEIN_CONTRAST, edge_width, local_box


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """One uniform rotation (3, 3), float64, drawn from `rng` (four normal draws)."""
    return random_rotations(1, generator=rng, dtype=torch.float64)[0].numpy()


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


class Species(Protocol):
    """Something that can be placed many times: a name, a kind, a bounding radius (A)
    and a way to add one rotated copy to a volume."""

    name: str
    kind: str

    @property
    def radius(self) -> float: ...

    def add_to(self, volume: torch.Tensor, rotation: torch.Tensor, center: torch.Tensor,
               voxel_size: float) -> None: ...


@dataclass
class Primitive:
    """One piece of a procedural shape, in the species frame (Angstrom).

    ``kind`` is ``"ellipsoid"`` (``size`` = three semi-axes) or ``"torus"`` (``size`` =
    (major radius, tube radius, unused), symmetry axis = the frame's first axis).
    ``rotation`` has the primitive's axes as columns; ``density`` is in volts.
    """

    kind: str
    center: np.ndarray
    size: np.ndarray
    rotation: np.ndarray
    density: float

    def extent(self) -> float:
        c = float(np.linalg.norm(self.center))
        if self.kind == "torus":
            return c + float(self.size[0] + self.size[1])
        return c + float(np.max(self.size))

    def scaled(self, f: float) -> Primitive:
        return Primitive(self.kind, self.center * f, self.size * f, self.rotation,
                         self.density)


@dataclass
class ProceduralSpecies:
    """A procedural macromolecule: the union of `primitives`, minus a channel of
    `channel_radius` A along the frame's first axis (0: none)."""

    name: str
    kind: str
    primitives: list[Primitive]
    channel_radius: float = 0.0

    @property
    def radius(self) -> float:
        return max(p.extent() for p in self.primitives)

    def _stacked(self, kind: str) -> tuple[torch.Tensor, ...] | None:
        """Primitives of one kind as stacked tensors: a (3, 3P) matrix A and offsets
        (3P,) with ``q @ A - b`` = the points in every primitive's frame (ellipsoids:
        divided by their semi-axes), plus sizes (P, 3) and densities (P,)."""
        prims = [p for p in self.primitives if p.kind == kind]
        if not prims:
            return None
        mats, offs = [], []
        for p in prims:
            m = p.rotation / p.size[None, :] if kind == "ellipsoid" else p.rotation
            mats.append(m)
            offs.append(p.center @ m)
        a = torch.as_tensor(np.concatenate(mats, axis=1), dtype=torch.float32)
        b = torch.as_tensor(np.concatenate(offs), dtype=torch.float32)
        size = torch.as_tensor(np.stack([p.size for p in prims]), dtype=torch.float32)
        dens = torch.as_tensor([p.density for p in prims], dtype=torch.float32)
        return a, b, size, dens

    def density(self, q: torch.Tensor, edge: float) -> torch.Tensor:
        """Density (V) at points q (n, 3) of the species frame (A): the largest of the
        primitives' ``density * sigmoid(signed distance / edge)``."""
        out = torch.zeros(q.shape[0], dtype=torch.float32)
        for kind in ("ellipsoid", "torus"):
            st = self._stacked(kind)
            if st is None:
                continue
            a, b, size, dens = st
            loc = (q @ a - b).reshape(q.shape[0], -1, 3)  # (n, P, 3)
            if kind == "ellipsoid":
                sd = (1.0 - loc.norm(dim=-1)) * size.min(dim=1).values
            else:
                rho = loc[..., 1:].norm(dim=-1)
                sd = size[:, 1] - torch.sqrt((rho - size[:, 0]) ** 2 + loc[..., 0] ** 2)
            val = torch.sigmoid(sd / edge) * dens
            out = torch.maximum(out, val.max(dim=1).values)
        if self.channel_radius > 0:
            rho = torch.sqrt(q[:, 1] ** 2 + q[:, 2] ** 2)
            out = out * torch.sigmoid((rho - self.channel_radius) / edge)
        return out

    def add_to(self, volume: torch.Tensor, rotation: torch.Tensor, center: torch.Tensor,
               voxel_size: float) -> None:
        """Add a copy rotated by `rotation` (acting on (z, y, x)) centred at `center`
        (voxels, float) to `volume` (Z, Y, X), in place."""
        edge = edge_width(voxel_size)
        half = int(math.ceil((self.radius + 4 * edge) / voxel_size)) + 1
        box = local_box(volume.shape, center, half)
        if box is None:
            return
        sl, grid = box
        p = grid.reshape(-1, 3) * voxel_size
        q = p @ rotation.to(torch.float32)  # R^T p, as rows
        volume[sl] += self.density(q, edge).reshape(grid.shape[:-1])


@dataclass
class AtomicSpecies:
    """A macromolecule from an atomic model; its vacuum potential is scaled by
    `SOLVENT_CONTRAST` to give contrast against ice."""

    model: AtomicModel
    kind: str = "atomic"
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.model.name
        self._params: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def radius(self) -> float:
        return self.model.radius + 2.0

    def add_to(self, volume: torch.Tensor, rotation: torch.Tensor, center: torch.Tensor,
               voxel_size: float) -> None:
        """Add a copy rotated by `rotation` centred at `center` (voxels) in place."""
        if self._params is None:
            self._params = peng_parameters(self.model)
        add_model_potential(volume, self.model, rotation, center * voxel_size, voxel_size,
                            scale=SOLVENT_CONTRAST, params=self._params)


# ---------------------------------------------------------------- procedural species

def _complex(rng: np.random.Generator, radius: float) -> list[Primitive]:
    n = int(rng.integers(2, 6))
    prims = []
    for i in range(n):
        dist = 0.0 if i == 0 else radius * rng.uniform(0.25, 0.5)
        size = radius * rng.uniform(0.32, 0.55) * np.array(
            [1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0)])
        prims.append(Primitive("ellipsoid", _unit(rng) * dist, size, _random_rotation(rng),
                               PROTEIN_CONTRAST * rng.uniform(0.85, 1.15)))
    return prims


def _ring(rng: np.random.Generator, radius: float, n_rings: int) -> list[Primitive]:
    major = radius * 0.62
    tube = radius * rng.uniform(0.22, 0.3)
    k = int(rng.integers(5, 9))
    spacing = 2.1 * tube
    prims = []
    for j in range(n_rings):
        z = (j - (n_rings - 1) / 2) * spacing
        dens = PROTEIN_CONTRAST * rng.uniform(0.85, 1.15)
        prims.append(Primitive("torus", np.array([z, 0.0, 0.0]),
                               np.array([major, tube, 0.0]), np.eye(3), dens))
        phase = rng.uniform(0, 2 * np.pi)
        for b in range(k):
            a = phase + 2 * np.pi * b / k
            c = np.array([z, major * np.sin(a), major * np.cos(a)])
            # bump elongated along the ring's tangent
            t = np.array([0.0, np.cos(a), -np.sin(a)])
            rad = np.array([0.0, np.sin(a), np.cos(a)])
            rot = np.stack([np.array([1.0, 0.0, 0.0]), t, rad], axis=1)
            prims.append(Primitive("ellipsoid", c, tube * np.array([1.05, 1.3, 1.2]), rot,
                                   dens * rng.uniform(0.95, 1.1)))
    return prims


def _chain(rng: np.random.Generator, radius: float) -> list[Primitive]:
    n = int(rng.integers(3, 5))
    pos = [np.zeros(3)]
    d = _unit(rng)
    for _ in range(n - 1):
        d = d + 0.8 * _unit(rng)
        d /= np.linalg.norm(d)
        pos.append(pos[-1] + d)
    pts = np.array(pos)
    pts -= pts.mean(0)
    prims = []
    for p in pts:
        size = rng.uniform(0.5, 0.75) * np.array([1.0, rng.uniform(0.7, 1), rng.uniform(0.6, 1)])
        prims.append(Primitive("ellipsoid", p, size, _random_rotation(rng),
                               PROTEIN_CONTRAST * rng.uniform(0.85, 1.15)))
    return prims


SPECIES_KINDS = ("complex", "ring", "barrel", "chain")


def make_procedural_species(rng: np.random.Generator, kind: str, diameter: float,
                            name: str = "") -> ProceduralSpecies:
    """One procedural species of `kind` (see `SPECIES_KINDS`), scaled so that its
    bounding sphere is `diameter` A across."""
    r = diameter / 2
    channel = 0.0
    if kind == "complex":
        prims = _complex(rng, r)
    elif kind == "ring":
        prims = _ring(rng, r, int(rng.integers(1, 3)))
    elif kind == "barrel":
        prims = _ring(rng, r, int(rng.integers(2, 5)))
    elif kind == "chain":
        prims = _chain(rng, r)
    else:
        raise ValueError(f"unknown species kind {kind!r}")
    sp = ProceduralSpecies(name or kind, kind, prims)
    f = r / sp.radius
    sp.primitives = [p.scaled(f) for p in prims]
    if kind == "barrel":
        tor = sp.primitives[0]
        channel = 0.55 * float(tor.size[0] - tor.size[1])
    sp.channel_radius = channel
    return sp


def procedural_species(rng: np.random.Generator, n: int, max_diameter: float,
                       min_diameter: float = 8 * NM) -> list[ProceduralSpecies]:
    """`n` random species, 8-25 nm across (never above `max_diameter` A), with sizes
    stratified over that range on a log scale (so every scene has small and large
    ones) and kinds cycling through `SPECIES_KINDS`."""
    hi = min(25 * NM, max_diameter)
    lo = min(min_diameter, hi)
    kinds = [SPECIES_KINDS[i % len(SPECIES_KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    strata = rng.permutation(n)
    out = []
    for i, kind in enumerate(kinds):
        f = (strata[i] + rng.uniform()) / n
        d = float(np.exp(np.log(lo) + f * (np.log(hi) - np.log(lo))))
        out.append(make_procedural_species(rng, kind, d, name=f"{kind}{i}"))
    return out
