"""Crowded, cell-like phantoms: macromolecules, a lipid vesicle and a filament.

Volumes are (Z, Y, X) float32 in volts: the electrostatic-potential *contrast* against
vitreous ice (ice is 0, protein about +2.6 V, lipid tails slightly negative). Lengths
are in Angstrom unless a name says voxels; voxel ``i`` has its centre at
``i * voxel_size``. Everything is kept inside the volume (a slab of Z voxels) with a
margin of one voxel, and no two objects overlap (bounding spheres, plus the
filament's cylinder, are kept apart by a gap of at least 1 nm).

Scene contents:

* particles: copies of a few *species* at random positions and orientations, either
  procedural (`ProceduralSpecies`: blobby multi-lobe complexes built from rotated
  ellipsoids, rings with bumps, stacked barrels with a channel, bent chains of beads;
  8-25 nm across) or from atomic models (`AtomicSpecies`, see
  `cryowae.physics.potential`). Procedural shapes have a uniform interior density and
  an edge softened over ~1/3 voxel (anti-aliased), and each lobe its own density
  (+-15%), which gives them domain-like texture;
* a lipid vesicle: headgroup layers 4 nm apart (Gaussians of 0.5 nm, +2.0 V) around a
  low-density tail region (-0.8 V);
* a filament crossing the field of view: actin-like (a one-start helix of 5 nm beads,
  rise 2.75 nm, twist -166.7 degrees, 7 nm across) or microtubule-like (13
  protofilaments of 4 nm tubulin beads on a 3-start lattice, 25 nm across).

Randomness comes only from the `numpy.random.Generator` passed in, so a seed fixes the
scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from cryowae.physics.potential import (
    SOLVENT_CONTRAST,
    AtomicModel,
    add_model_potential,
    peng_parameters,
)
from cryowae.physics.rotation import random_rotations

#: protein contrast against vitreous ice, volts (mean inner potentials 6.8 - 4.2 V)
PROTEIN_CONTRAST = 2.6
#: lipid headgroup and tail contrast against ice, volts
HEADGROUP_CONTRAST = 2.0
TAIL_CONTRAST = -0.8
NM = 10.0  # Angstrom


def edge_width(voxel_size: float) -> float:
    """Softness (A) of procedural edges: density = rho * sigmoid(distance / width)."""
    return max(2.0, 0.3 * voxel_size)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


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


def _local_box(shape: Sequence[int], center: torch.Tensor, half: int
               ) -> tuple[tuple[slice, ...], torch.Tensor] | None:
    """Slices of the box of half-size `half` voxels around `center` (voxels, float),
    clipped to `shape`, and the (n, 3) voxel offsets (float) of its voxels from
    `center`."""
    base = torch.floor(center).to(torch.int64)
    lo = torch.clamp(base - half, min=0)
    hi = torch.minimum(base + half + 1, torch.tensor(list(shape)))
    if bool((hi <= lo).any()):
        return None
    axes = [torch.arange(int(a), int(b), dtype=torch.float32) - float(c)
            for a, b, c in zip(lo, hi, center, strict=True)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    return sl, grid


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
        box = _local_box(volume.shape, center, half)
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


# ---------------------------------------------------------------- membranes, filaments

def bilayer_profile(d: torch.Tensor, voxel_size: float) -> torch.Tensor:
    """Lipid-bilayer contrast (V) at signed distances `d` (A) from the mid-plane:
    headgroups at +-20 A (Gaussians, sigma 5 A), tails in between (sigma 8 A), each
    widened by the voxel's box average (variance voxel^2 / 12) at constant integral."""
    extra = voxel_size**2 / 12

    def g(x: torch.Tensor, sigma: float, amp: float) -> torch.Tensor:
        s = math.sqrt(sigma**2 + extra)
        return amp * sigma / s * torch.exp(-0.5 * (x / s) ** 2)

    return (g(d - 20.0, 5.0, HEADGROUP_CONTRAST) + g(d + 20.0, 5.0, HEADGROUP_CONTRAST)
            + g(d, 8.0, TAIL_CONTRAST))


def add_vesicle(volume: torch.Tensor, center: torch.Tensor, radius: float,
                voxel_size: float) -> None:
    """Add a vesicle (bilayer mid-plane at `radius` A, centre in voxels) in place."""
    half = int(math.ceil((radius + 40.0) / voxel_size)) + 1
    box = _local_box(volume.shape, center, half)
    if box is None:
        return
    sl, grid = box
    r = grid.norm(dim=-1) * voxel_size
    volume[sl] += bilayer_profile(r - radius, voxel_size)


def union_of_spheres(shape: Sequence[int], centers: torch.Tensor, radius: float,
                     voxel_size: float, density: float) -> torch.Tensor:
    """Density (V) of the union of spheres of `radius` A at `centers` (n, 3, voxels),
    with edges softened like the procedural species. Returns a (Z, Y, X) tensor."""
    edge = edge_width(voxel_size)
    zdim, ydim, xdim = (int(s) for s in shape)
    field_ = torch.full((zdim * ydim * xdim,), -1e4, dtype=torch.float32)
    if centers.numel():
        h = int(math.ceil((radius + 4 * edge) / voxel_size)) + 1
        ax = torch.arange(-h, h + 1)
        off = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
        base = torch.floor(centers).to(torch.int64)
        for chunk in range(0, base.shape[0], 256):
            b = base[chunk:chunk + 256]
            c = centers[chunk:chunk + 256].to(torch.float32)
            idx = b[:, None, :] + off[None]
            inb = ((idx >= 0) & (idx < torch.tensor([zdim, ydim, xdim]))).all(-1)
            s = radius - (idx.to(torch.float32) - c[:, None, :]).norm(dim=-1) * voxel_size
            flat = (idx[..., 0] * ydim + idx[..., 1]) * xdim + idx[..., 2]
            field_.scatter_reduce_(0, flat[inb], s[inb], reduce="amax")
    return (density * torch.sigmoid(field_ / edge)).reshape(zdim, ydim, xdim)


FILAMENTS = {
    # outer radius (A) of the filament, for placement
    "actin": 37.0,
    "microtubule": 126.0,
}


def filament_beads(kind: str, length: float) -> tuple[np.ndarray, float]:
    """Bead centres (n, 3) in A of a filament along the frame's first axis, centred on
    the origin and `length` A long, and the bead radius (A)."""
    if kind == "actin":
        rise, twist, r_helix, r_bead = 27.5, np.deg2rad(-166.7), 10.0, 25.0
        n = int(length // rise) + 1
        i = np.arange(n) - n // 2
        a = i * twist
        pts = np.stack([i * rise, r_helix * np.sin(a), r_helix * np.cos(a)], 1)
        return pts, r_bead
    if kind == "microtubule":
        n_pf, spacing, r_wall, r_bead = 13, 40.0, 100.0, 26.0
        n = int(length // spacing) + 1
        pts = []
        for pf in range(n_pf):
            a = 2 * np.pi * pf / n_pf
            z0 = pf * 3 * spacing / n_pf
            i = np.arange(n) - n // 2
            zz = i * spacing + z0
            pts.append(np.stack([zz, r_wall * np.sin(a) * np.ones(n),
                                 r_wall * np.cos(a) * np.ones(n)], 1))
        return np.concatenate(pts), r_bead
    raise ValueError(f"unknown filament kind {kind!r}")


# ---------------------------------------------------------------- placement

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


def make_scene(shape: Sequence[int], voxel_size: float, rng: np.random.Generator,
               species: Sequence[Species] | None = None, n_species: int = 6,
               crowding: float = 0.3, vesicle: bool = True, filament: bool = True,
               progress=None) -> Scene:
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

    Returns
    -------
    Scene
        The volume (volts, contrast against ice) and ``info``: species (name, kind,
        diameter_nm, copies), particles (species, centre in voxels, rotation),
        vesicle and filament parameters, volume fraction of particles.
    """
    zdim, ydim, xdim = (int(s) for s in shape)
    vs = float(voxel_size)
    vol = torch.zeros(zdim, ydim, xdim, dtype=torch.float32)
    dims = np.array([zdim, ydim, xdim], dtype=float)
    margin = 1.0  # voxels kept empty at every face
    gap = max(1 * NM, 0.5 * vs) / vs  # voxels between objects
    obst = _Obstacles()
    info: dict[str, Any] = {"units": "volts (potential contrast against vitreous ice)"}
    gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))

    def room(r_vox: float) -> tuple[np.ndarray, np.ndarray] | None:
        lo = np.full(3, r_vox + margin)
        hi = dims - 1 - r_vox - margin
        return None if bool((hi < lo).any()) else (lo, hi)

    # vesicle (bilayer mid-plane radius R; outer edge R + 3.5 nm)
    info["vesicle"] = None
    if vesicle:
        r_max = (min(dims) * vs / 2 - margin * vs - 3.5 * NM) * 0.95
        if r_max >= 10 * NM:
            for _ in range(200):
                radius = rng.uniform(min(15 * NM, r_max), min(35 * NM, r_max))
                r_out = (radius + 3.5 * NM) / vs
                lo, hi = room(r_out)  # type: ignore[misc]
                cand = rng.uniform(lo, hi)[None]
                if obst.free(cand, r_out + gap)[0]:
                    add_vesicle(vol, torch.as_tensor(cand[0], dtype=torch.float32), radius, vs)
                    obst.add_sphere(cand[0], r_out)
                    info["vesicle"] = {"center_zyx": cand[0].round(2).tolist(),
                                       "radius_nm": round(radius / NM, 2),
                                       "bilayer": "headgroups 4 nm apart"}
                    break

    # filament, clear of the vesicle
    info["filament"] = None
    if filament:
        # a filament may take at most a third of the slab's thickness
        kinds = [k for k, r in FILAMENTS.items()
                 if room(r / vs) is not None and 6 * r <= zdim * vs]
        if kinds:
            kind = kinds[-1] if len(kinds) > 1 and rng.random() < 0.5 else kinds[0]
            r_f = FILAMENTS[kind] / vs
            lo, hi = room(r_f)  # type: ignore[misc]
            half_len = 0.5 * math.hypot(ydim, xdim) + r_f + 2
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
                        obst.centers, a, b) >= obst.radii + r_f + gap).all()):
                    break
            else:
                kind = ""
        if kinds and kind:
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
            vol += union_of_spheres(vol.shape, torch.as_tensor(world, dtype=torch.float32),
                                    r_bead, vs, PROTEIN_CONTRAST)
            obst.segments.append((a, b, r_f + gap))
            info["filament"] = {"kind": kind, "axis_start_zyx": a.round(2).tolist(),
                                "axis_end_zyx": b.round(2).tolist(),
                                "diameter_nm": round(2 * FILAMENTS[kind] / NM, 1)}

    # particles
    if species is None:
        # particles at most half the slab thick, so that many fit
        species = procedural_species(rng, n_species, max_diameter=zdim * vs / 2)
    fits = [s for s in species if room(s.radius / vs) is not None]
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
        slab = float(np.prod(dims - 2 * margin)) * vs**3
        target = crowding * slab
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
            lo, hi = room(r_vox)  # type: ignore[misc]
            placed = None
            for _ in range(3):
                cand = rng.uniform(lo, hi, size=(48, 3))
                ok = np.flatnonzero(obst.free(cand, r_vox + gap))
                if len(ok):
                    placed = cand[ok[0]]
                    break
            if placed is not None:
                sp.add_to(vol, rots[n], torch.as_tensor(placed, dtype=torch.float32), vs)
                obst.add_sphere(placed, r_vox)
                occupied += 4 / 3 * math.pi * sp.radius**3
                particles.append({"species": sp.name, "center_zyx": placed.round(3).tolist(),
                                  "rotation_zyx": rots[n].numpy().round(5).tolist()})
                info["species"][index[id(sp)]]["copies"] += 1
            if progress is not None:
                progress.advance(1)
    info["particles"] = particles
    info["n_particles"] = len(particles)
    info["particle_volume_fraction"] = round(
        occupied / (float(np.prod(dims)) * vs**3), 4)
    return Scene(volume=vol, info=info)
