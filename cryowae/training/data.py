"""Training data: tomograms (and even/odd halves), global normalisation, subtomogram sampling.

Volumes stay memory-mapped; each subtomogram is cut out on demand and normalised with
the statistics of its whole volume, computed once. Sampling favours regions with
structure over empty ice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cryowae.errors import CryowaeInputError
from cryowae.io import read_volume
from cryowae.io.mrc import check_finite
from cryowae.io.stats import volume_stats
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge_estimate import spectrum_warning
from cryowae.progress import ProgressReporter, ensure_progress


def structure_map(data: Any, bin_factor: int = 4) -> np.ndarray:
    """Coarse (Z/b, Y/b, X/b) map of local structure: variance of the binned volume in a
    3x3x3 neighbourhood. High in particles and membranes, low in empty ice."""
    nz, ny, nx = (s // bin_factor for s in data.shape)
    binned = np.empty((nz, ny, nx), dtype=np.float32)
    for z in range(nz):
        block = np.asarray(data[z * bin_factor:(z + 1) * bin_factor, :ny * bin_factor,
                                :nx * bin_factor], dtype=np.float32)
        binned[z] = block.reshape(bin_factor, ny, bin_factor, nx, bin_factor).mean(axis=(0, 2, 4))
    t = torch.from_numpy(binned)[None, None]
    t = (t - t.mean()) / (t.std() + 1e-8)
    mean = F.avg_pool3d(t, 3, stride=1, padding=1, count_include_pad=False)
    var = F.avg_pool3d(t**2, 3, stride=1, padding=1, count_include_pad=False) - mean**2
    return (var.clamp_min(0) + mean.abs() ** 2)[0, 0].numpy()


@dataclass
class TomogramSource:
    """One tomogram for training: the full reconstruction and optional even/odd halves."""

    name: str
    full: Any
    even: Any = None
    odd: Any = None
    voxel_size: float = 1.0
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    structure: np.ndarray | None = None
    #: volumes whose missing wedge was refilled by the model (see refill.py), by name
    refilled: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.full.shape)  # type: ignore[return-value]

    @property
    def has_halves(self) -> bool:
        return self.even is not None and self.odd is not None

    def crop(self, which: str, start: tuple[int, int, int], size: tuple[int, int, int],
             refilled: bool = False) -> np.ndarray:
        """A normalised float32 crop of `which` ('full', 'even' or 'odd'); from its
        refilled version if `refilled` and there is one."""
        vol = self.refilled.get(which) if refilled else None
        vol = getattr(self, which) if vol is None else vol
        z, y, x = start
        a = np.asarray(vol[z:z + size[0], y:y + size[1], x:x + size[2]], dtype=np.float32)
        mean, std = self.stats[which]
        return (a - mean) / std


def load_sources(tomograms: list[str | Path], even: list[str | Path] | None = None,
                 odd: list[str | Path] | None = None, min_size: int = 16,
                 check_nan: bool = True, geometry: TiltGeometry | None = None,
                 progress: ProgressReporter | None = None) -> list[TomogramSource]:
    """Open tomograms (and halves, matched in order) and compute their statistics.
    With `geometry`, each tomogram whose own spectrum contradicts it gets one warning
    line through `progress` (`cryowae.physics.wedge_estimate.spectrum_warning`)."""
    even, odd = list(even or []), list(odd or [])
    if len(even) != len(odd):
        raise CryowaeInputError(f"got {len(even)} --even and {len(odd)} --odd halves; "
                                "give them in pairs")
    if even and len(even) != len(tomograms):
        raise CryowaeInputError(f"got {len(tomograms)} tomograms but {len(even)} even/odd "
                                "pairs; give one pair per tomogram, in the same order")
    sources = []
    for i, path in enumerate(tomograms):
        vol = read_volume(path, check_nan=check_nan)
        src = TomogramSource(name=Path(path).name, full=vol.data, voxel_size=vol.voxel_size)
        if even:
            e = read_volume(even[i], check_nan=check_nan)
            o = read_volume(odd[i], check_nan=check_nan)
            if e.shape != o.shape or e.shape != vol.shape:
                raise CryowaeInputError(
                    f"even/odd halves {Path(even[i]).name} {e.shape} and {Path(odd[i]).name} "
                    f"{o.shape} must have the shape of {src.name} {vol.shape}")
            src.even, src.odd = e.data, o.data
        if min(src.shape) < min_size:
            raise CryowaeInputError(f"{src.name}: shape {src.shape} is smaller than the "
                                    f"training patch ({min_size} voxels)")
        for which in ("full", "even", "odd"):
            if getattr(src, which) is not None:
                src.stats[which] = volume_stats(getattr(src, which))
        src.structure = structure_map(src.full)
        seen = spectrum_warning(src.full, geometry, src.name) if geometry else None
        if seen:
            ensure_progress(progress).log(seen)
        sources.append(src)
    vs = [s.voxel_size for s in sources]
    if max(vs) > 1.05 * min(vs):
        raise CryowaeInputError(f"tomograms have different voxel sizes {vs}; bin them to one")
    return sources


def check_finite_sources(sources: list[TomogramSource]) -> None:
    for s in sources:
        for which in ("full", "even", "odd"):
            if getattr(s, which) is not None:
                check_finite(getattr(s, which), name=f"{s.name} ({which})")


def rotation_crop_size(patch: int) -> int:
    """Side of the cube to cut so a patch rotated arbitrarily stays inside real data."""
    return int(math.ceil(patch * math.sqrt(3) / 2) * 2)


class SubtomogramSampler:
    """Draws (input, target) subtomogram pairs for self-supervised training.

    With halves, input and target come from different halves (noise2noise), the roles
    swapped at random. Without, both come from the full tomogram (single-tomogram mode:
    wedge filling without denoising). Crops are larger than the patch when the volume
    allows it, so that the rotation in `augment` fills the patch with real data.
    """

    def __init__(self, sources: list[TomogramSource], patch_size: int,
                 structure_bias: float = 0.7, seed: int = 0) -> None:
        self.sources = sources
        self.patch = patch_size
        self.structure_bias = structure_bias
        self.rng = np.random.default_rng(seed)
        self.noise2noise = all(s.has_halves for s in sources)
        want = rotation_crop_size(patch_size)
        self.crop_shapes = [tuple(min(want, d) for d in s.shape) for s in sources]
        # per source: (probabilities over coarse start cells, the cell grid's shape, the
        # cell size in voxels)
        self._grids = [self._start_grid(s, c) for s, c in zip(sources, self.crop_shapes,
                                                             strict=True)]

    @property
    def mode(self) -> str:
        return "noise2noise (even/odd halves)" if self.noise2noise else "single-tomogram"

    @staticmethod
    def _start_grid(src: TomogramSource, crop: tuple[int, ...]
                    ) -> tuple[np.ndarray, tuple[int, int, int], float]:
        """Probabilities over crop start positions on the coarse structure grid, the
        grid's shape and its cell size (voxels)."""
        smap = src.structure
        assert smap is not None
        b = src.shape[0] / max(smap.shape[0], 1)
        # coarse cells whose crop fits inside the volume
        limits = tuple(max(1, int((d - c) / b) + 1) for d, c in zip(src.shape, crop,
                                                                    strict=True))
        half = [int(c / (2 * b)) for c in crop]
        sub = smap[half[0]:half[0] + limits[0], half[1]:half[1] + limits[1],
                   half[2]:half[2] + limits[2]]
        w = np.zeros(limits, dtype=np.float64)
        w[:sub.shape[0], :sub.shape[1], :sub.shape[2]] = sub
        w = np.clip(w, 0, None) + 1e-6
        return (w / w.sum()).ravel(), limits, b  # type: ignore[return-value]

    def _start(self, i: int) -> tuple[int, int, int]:
        src, crop = self.sources[i], self.crop_shapes[i]
        hi = [d - c for d, c in zip(src.shape, crop, strict=True)]
        if self.rng.random() < self.structure_bias:
            w, shape, b = self._grids[i]
            cell = np.unravel_index(self.rng.choice(w.size, p=w), shape)
            jitter = self.rng.integers(0, max(1, int(b)), size=3)
            return tuple(int(min(h, c * b + j))  # type: ignore[return-value]
                         for h, c, j in zip(hi, cell, jitter, strict=True))
        return tuple(int(self.rng.integers(0, h + 1)) for h in hi)  # type: ignore[return-value]

    def sample(self, batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """`batch_size` (input, target) crop pairs, normalised float32 (Z, Y, X) arrays.

        Targets are always cut from the measured volumes, never from refilled ones.
        """
        inputs, targets = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.sources)))
            start, crop = self._start(i), self.crop_shapes[i]
            src = self.sources[i]
            if self.noise2noise:
                a, b = ("even", "odd") if self.rng.random() < 0.5 else ("odd", "even")
                inputs.append(src.crop(a, start, crop, refilled=True))
                targets.append(src.crop(b, start, crop))
            else:
                inputs.append(src.crop("full", start, crop, refilled=True))
                targets.append(src.crop("full", start, crop))
        return inputs, targets
