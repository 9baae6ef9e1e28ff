"""The settings of a simulated tomogram (`SimulationConfig`), validated in one place."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.errors import CryowaeInputError
from cryowae.physics.geometry import TiltGeometry


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
    empty_planes
        Planes at each Z face that hold no object, only ice and noise (a
        reconstruction thicker than its specimen, as labs make them); 0: the specimen
        fills the slab but for a one-voxel margin.
    voxel_size
        Angstrom per voxel (also the detector pixel size).
    tilt_min, tilt_max, tilt_step
        Tilt range and increment in degrees.
    tilt_axis
        ``"y"`` (default) or ``"x"`` (`cryowae.physics.wedge` convention).
    angles
        Explicit tilt angles in degrees (e.g. from a .tlt file), used instead of
        ``tilt_min, tilt_min + tilt_step, ...``; their extremes must be tilt_min and
        tilt_max. Empty: the regular series.
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
    empty_planes: int = 0
    voxel_size: float = 8.0
    tilt_min: float = -60.0
    tilt_max: float = 60.0
    tilt_step: float = 3.0
    tilt_axis: str = "y"
    angles: tuple[float, ...] = field(default_factory=tuple)
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

    @classmethod
    def from_geometry(cls, geometry: TiltGeometry, angles: Any = (), **kw: Any
                      ) -> SimulationConfig:
        """A config whose tilt range and axis are `geometry`'s; `angles` (degrees, e.g.
        the tilt file's) optional; other settings as keywords."""
        return cls(tilt_min=geometry.tilt_min, tilt_max=geometry.tilt_max,
                   tilt_axis=geometry.axis,
                   angles=tuple(float(a) for a in np.asarray(angles, dtype=float).ravel()),
                   **kw)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(Z, Y, X) in voxels."""
        z = default_thickness(self.size) if self.thickness is None else int(self.thickness)
        return (z, int(self.size), int(self.size))

    @property
    def geometry(self) -> TiltGeometry:
        """The tilt range and axis as a `TiltGeometry` (validated)."""
        return TiltGeometry(self.tilt_min, self.tilt_max, self.tilt_axis, "simulation")

    def tilt_angles(self) -> np.ndarray:
        """Tilt angles in degrees, ascending: the explicit `angles`, else tilt_min,
        tilt_min + step, ... up to tilt_max."""
        if self.angles:
            return np.sort(np.asarray(self.angles, dtype=np.float64))
        n = int(math.floor((self.tilt_max - self.tilt_min) / self.tilt_step + 1e-6)) + 1
        return self.tilt_min + self.tilt_step * np.arange(n, dtype=np.float64)

    def validate(self) -> None:
        """Raise `CryowaeInputError` for any impossible setting or missing PDB file."""

        def positive(name: str, value: float) -> None:
            if not (math.isfinite(value) and value > 0):
                raise CryowaeInputError(f"--{name} must be positive, got {value:g}")

        if int(self.size) < 16:
            raise CryowaeInputError(f"--size must be at least 16 voxels, got {self.size}")
        if self.thickness is not None and int(self.thickness) < 8:
            raise CryowaeInputError(f"--thickness must be at least 8 voxels, got "
                                    f"{self.thickness}")
        if not 0 <= int(self.empty_planes) <= (self.shape[0] - 8) // 2:
            raise CryowaeInputError(
                f"--empty-planes must lie in [0, {(self.shape[0] - 8) // 2}] for a "
                f"{self.shape[0]}-plane slab (8 planes left to the specimen), got "
                f"{self.empty_planes}")
        positive("voxel-size", self.voxel_size)
        geo = self.geometry  # checks the range and the axis
        positive("tilt-step", self.tilt_step)
        if self.angles:
            a = self.tilt_angles()
            if len(a) < 2 or abs(a[0] - geo.tilt_min) > 1e-6 or abs(a[-1] - geo.tilt_max) > 1e-6:
                raise CryowaeInputError(
                    f"the {len(a)} tilt angles ({a[0]:g}..{a[-1]:g}) do not span the tilt "
                    f"range {geo.tilt_min:g}..{geo.tilt_max:g}")
        elif len(self.tilt_angles()) < 2:
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
        """Plain values for meta.json (the thickness resolved, paths as strings)."""
        d = asdict(self)
        d["pdb"] = [str(p) for p in self.pdb]
        d["angles"] = [float(a) for a in self.angles]
        d["thickness"] = self.shape[0]
        return d
