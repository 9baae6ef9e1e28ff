"""Density building blocks of the phantoms: soft edges, local boxes, lipid bilayers
(vesicles) and filaments as unions of beads.

Volumes are (Z, Y, X) float32 in volts of potential contrast against vitreous ice;
lengths are in Angstrom unless a name says voxels; voxel ``i`` has its centre at
``i * voxel_size``. All functions are deterministic (no randomness here).

* lipid bilayer: headgroup layers 4 nm apart (Gaussians of 0.5 nm, +2.0 V) around a
  low-density tail region (-0.8 V);
* filaments: actin-like (a one-start helix of 5 nm beads, rise 2.75 nm, twist -166.7
  degrees, 7 nm across) or microtubule-like (13 protofilaments of 4 nm tubulin beads on
  a 3-start lattice, 25 nm across).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

#: protein contrast against vitreous ice, volts (mean inner potentials 6.8 - 4.2 V)
PROTEIN_CONTRAST = 2.6
#: lipid headgroup and tail contrast against ice, volts
HEADGROUP_CONTRAST = 2.0
TAIL_CONTRAST = -0.8
NM = 10.0  # Angstrom


def edge_width(voxel_size: float) -> float:
    """Softness (A) of procedural edges: density = rho * sigmoid(distance / width)."""
    return max(2.0, 0.3 * voxel_size)


def local_box(shape: Sequence[int], center: torch.Tensor, half: int
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
    box = local_box(volume.shape, center, half)
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

