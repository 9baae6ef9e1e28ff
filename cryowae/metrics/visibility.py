"""How visible annotated surface patches are, by the direction they face.

A thin layer (a membrane, a protein lattice) whose normal n lies in the missing wedge
has its Fourier power along n, i.e. in the wedge: a raw tomogram shows the sides of a
spherical shell but not its top and bottom (the patches facing the beam, Z). Given an
annotation of points p_i on such layers with unit normals n_i ((z, y, x), voxels of the
tomogram), each patch is scored by the layer's contrast along its normal:

    v(t) = trilinear sample of the normalised volume (zero mean, unit std over all
           voxels) at p_i + t n_i, t in voxels, t = -flank[1] .. flank[1] by `step`
    c_i = mean_{|t| <= layer_halfwidth} v(t) - mean_{flank[0] <= |t| <= flank[1]} v(t)

(the layer against both flanks together, so the step between a particle's inside and
outside does not enter and the sign of n_i does not matter). Patches are grouped by
the angle between n_i and the beam axis Z: *beam-facing* when it is at most `cone_deg`
(``|n_z| >= cos(cone)``), *side-facing* when n_i is within `cone_deg` of the XY plane
(``|n_z| <= sin(cone)``); patches in between, and those whose profile leaves the
volume, are not counted. The figure is

    visibility ratio = mean_{beam-facing} c_i / mean_{side-facing} c_i

about 1 when the tops and bottoms are as visible as the sides, near 0 when the wedge
hides them. The class means are also reported (in units of the volume's std, so raw
and restored tomograms compare) with their standard errors (std / sqrt(n)).

Annotation files (`Annotation.from_files`): positions (N, 3) and/or an (N, 2, 3)
position-and-normal array (napari vectors layer: [position, direction]), z, y, x, in
voxels times ``1 / scale`` (the EMPIAR-10164 sample annotation is 4x finer than its
tomogram: ``scale = 0.25``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor, volume_moments


@dataclass(frozen=True)
class VisibilitySettings:
    """Profile and class definitions of `shell_visibility` (lengths in voxels, angles
    in degrees)."""

    cone_deg: float = 30.0
    layer_halfwidth: float = 1.0
    flank: tuple[float, float] = (3.0, 6.0)
    step: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.cone_deg < 45.0:
            raise CryowaeInputError(f"cone_deg must lie in (0, 45) degrees (the two classes "
                                    f"must not overlap), got {self.cone_deg:g}")
        lo, hi = (float(x) for x in self.flank)
        if not (0.0 < self.step and 0.0 <= self.layer_halfwidth < lo < hi):
            raise CryowaeInputError(f"need 0 <= layer_halfwidth < flank[0] < flank[1] and "
                                    f"step > 0, got {self.layer_halfwidth:g}, ({lo:g}, "
                                    f"{hi:g}), {self.step:g}")
        object.__setattr__(self, "flank", (lo, hi))


@dataclass(frozen=True)
class Annotation:
    """Points on surfaces and their unit normals, (N, 3) each, z, y, x in voxels of the
    tomogram (float64)."""

    points: np.ndarray
    normals: np.ndarray

    @classmethod
    def from_arrays(cls, points: Any, normals: Any, scale: float = 1.0) -> Annotation:
        """Validate and scale: `points` (N, 3) times `scale`; `normals` (N, 3),
        normalised to unit length."""
        if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
            raise CryowaeInputError(f"annotation scale must be a positive number, got "
                                    f"{scale!r}")
        p = np.asarray(points, dtype=np.float64)
        n = np.asarray(normals, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 3 or n.shape != p.shape:
            raise CryowaeInputError(f"annotation: need (N, 3) points and (N, 3) normals, "
                                    f"got {p.shape} and {n.shape}")
        if len(p) == 0:
            raise CryowaeInputError("annotation: no points")
        if not (np.isfinite(p).all() and np.isfinite(n).all()):
            raise CryowaeInputError("annotation: NaN or infinite coordinates")
        length = np.linalg.norm(n, axis=1)
        if (length < 1e-6).any():
            raise CryowaeInputError(f"annotation: {int((length < 1e-6).sum())} normals of "
                                    "zero length")
        return cls(p * scale, n / length[:, None])

    @classmethod
    def from_files(cls, points: str | os.PathLike | None, normals: str | os.PathLike,
                   scale: float = 1.0) -> Annotation:
        """Read .npy files: `normals` is (N, 2, 3) [position, normal] (then `points`
        is optional and, when given, must hold the same N positions) or (N, 3) normals
        (then `points` (N, 3) is needed)."""
        nv = _load(normals, "--normals")
        if nv.ndim == 3 and nv.shape[1:] == (2, 3):
            pos, nrm = nv[:, 0], nv[:, 1]
            if points is not None:
                pp = _load(points, "--points")
                if pp.shape != pos.shape:
                    raise CryowaeInputError(f"--points holds {pp.shape}, --normals "
                                            f"positions {pos.shape}: not the same points")
                pos = pp
            return cls.from_arrays(pos, nrm, scale)
        if nv.ndim == 2 and nv.shape[1] == 3:
            if points is None:
                raise CryowaeInputError("--normals holds (N, 3) normals only: give their "
                                        "positions with --points")
            return cls.from_arrays(_load(points, "--points"), nv, scale)
        raise CryowaeInputError(f"--normals {normals}: expected (N, 2, 3) [position, "
                                f"normal] or (N, 3) normals, got shape {nv.shape}")


def _load(path: str | os.PathLike, option: str) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except FileNotFoundError:
        raise CryowaeInputError(f"{option} {path}: no such file") from None
    except (OSError, ValueError, TypeError) as exc:
        raise CryowaeInputError(f"{option} {path}: not a numeric .npy array ({exc})"
                                ) from None


def normal_profiles(volume: Any, annotation: Annotation, settings: VisibilitySettings
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trilinear profiles of the normalised `volume` along each normal.

    Returns
    -------
    offsets, profiles, inside
        (T,) offsets t (voxels), (N, T) values (nan for patches whose profile leaves
        the volume) and (N,) bool of the patches whose profile lies inside.
    """
    v = as_tensor(volume, "volume")
    if v.ndim != 3:
        raise CryowaeInputError(f"expected a (Z, Y, X) volume, got shape {tuple(v.shape)}")
    # the volume stays float32 (no whole-tomogram float64 copy); its moments and the
    # profiles are float64
    mean, sd = volume_moments(v)
    reach = settings.flank[1]
    n_half = int(math.floor(reach / settings.step + 1e-9))
    t = np.arange(-n_half, n_half + 1) * settings.step
    pts = annotation.points[:, None, :] + t[None, :, None] * annotation.normals[:, None, :]
    size = np.array(v.shape, dtype=np.float64)
    inside = ((pts >= 0) & (pts <= size - 1)).all(axis=(1, 2))
    # grid_sample wants (x, y, z) in [-1, 1]; align_corners=True puts -1 and 1 on the
    # centres of the first and last voxel
    norm = 2.0 * pts / np.maximum(size - 1, 1) - 1.0
    grid = torch.from_numpy(norm[..., ::-1].astype(np.float32))[None, None]  # (1,1,N,T,3)
    with torch.no_grad():
        out = F.grid_sample(v[None, None], grid, mode="bilinear", align_corners=True)
    # trilinear sampling is linear, so normalising the samples equals sampling the
    # normalised volume
    prof = (out[0, 0, 0].double().numpy() - mean) / (sd if sd > 0 else 1.0)
    prof[~inside] = np.nan
    return t, prof, inside


def shell_visibility(volume: Any, annotation: Annotation,
                     settings: VisibilitySettings | None = None) -> dict[str, Any]:
    """Contrast of beam-facing against side-facing patches (module docstring).

    Returns
    -------
    dict
        ``visibility_ratio`` (nan when a class is empty or the sides show no contrast),
        ``contrast_beam``, ``contrast_side`` (class means, units of the volume's std)
        with ``contrast_beam_se``, ``contrast_side_se``, ``n_beam``, ``n_side`` (patches
        counted) and ``n_outside`` (annotated patches whose profile leaves the volume).
    """
    s = settings or VisibilitySettings()
    t, prof, inside = normal_profiles(volume, annotation, s)
    layer = np.abs(t) <= s.layer_halfwidth
    flank = (np.abs(t) >= s.flank[0]) & (np.abs(t) <= s.flank[1])
    contrast = prof[:, layer].mean(axis=1) - prof[:, flank].mean(axis=1)
    nz = np.abs(annotation.normals[:, 0])
    cone = math.radians(s.cone_deg)
    classes = {"beam": inside & (nz >= math.cos(cone)), "side": inside & (nz <= math.sin(cone))}
    out: dict[str, Any] = {}
    for name, sel in classes.items():
        c = contrast[sel]
        out[f"contrast_{name}"] = float(c.mean()) if c.size else float("nan")
        out[f"contrast_{name}_se"] = (float(c.std(ddof=1) / math.sqrt(c.size)) if c.size > 1
                                      else float("nan"))
        out[f"n_{name}"] = int(c.size)
    side = out["contrast_side"]
    ratio = out["contrast_beam"] / side if math.isfinite(side) and side > 0 else float("nan")
    out["visibility_ratio"] = ratio
    out["n_outside"] = int((~inside).sum())
    return out


__all__ = ["Annotation", "VisibilitySettings", "normal_profiles", "shell_visibility"]
