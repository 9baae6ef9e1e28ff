"""Layer data tuples ``(data, kwargs, layer_type)`` for tomograms, posterior families and
Fourier sections, shared by the reader, the sample data and the dock widget.

Spatial scale and translate are in Angstrom (z, y, x); leading non-spatial axes (the
sample axis ``s`` of a family) get scale 1. Every layer carries
``metadata["cryowae"]`` with its kind and voxel size, which the widget reads back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._display import coarsest, fourier_section, robust_limits

LayerData = tuple[Any, dict[str, Any], str]

#: percentiles for a tomogram's grey levels and for the std overlay
TOMOGRAM_PERCENTILES = (0.5, 99.5)
STD_PERCENTILES = (50.0, 99.8)
STD_COLORMAP = "magma"


def _levels(data: Any) -> list[Any]:
    return list(data) if isinstance(data, list | tuple) else [data]


def _geometry(ndim: int, voxel_size: float, origin: Sequence[float]) -> dict[str, Any]:
    lead = ndim - 3
    v = float(voxel_size)
    return {"scale": (1.0,) * lead + (v, v, v),
            "translate": (0.0,) * lead + tuple(float(o) for o in origin[-3:])}


def _meta(kind: str, voxel_size: float, extra: dict[str, Any] | None) -> dict[str, Any]:
    return {"cryowae": {"kind": kind, "voxel_size": float(voxel_size)} | (extra or {})}


def volume_layer(data: Any, name: str, voxel_size: float,
                 origin: Sequence[float] = (0.0, 0.0, 0.0), kind: str = "tomogram",
                 extra: dict[str, Any] | None = None, **kwargs: Any) -> LayerData:
    """A grey-level image layer of a (..., Z, Y, X) array or of a list of pyramid levels
    (finest first, shown as multiscale). The data object is passed through untouched
    (memmaps and zarr arrays stay lazy); contrast limits come from a subsample of the
    coarsest level."""
    levels = _levels(data)
    multiscale = len(levels) > 1
    limits = robust_limits(coarsest(levels) if multiscale else levels[0],
                           *TOMOGRAM_PERCENTILES)
    kw = {"name": name, "colormap": "gray", "contrast_limits": limits,
          "multiscale": multiscale, "metadata": _meta(kind, voxel_size, extra),
          **_geometry(levels[0].ndim, voxel_size, origin)} | kwargs
    return (levels if multiscale else levels[0], kw, "image")


def std_layer(data: Any, name: str, voxel_size: float,
              origin: Sequence[float] = (0.0, 0.0, 0.0),
              extra: dict[str, Any] | None = None, **kwargs: Any) -> LayerData:
    """The per-voxel standard deviation as a colour-mapped additive overlay: voxels below
    the median std stay dark, so only the places the data leave open light up."""
    levels = _levels(data)
    layer = volume_layer(data, name, voxel_size, origin, kind="std", extra=extra)
    kw = layer[1] | {
        "colormap": STD_COLORMAP, "blending": "additive", "opacity": 0.8,
        "contrast_limits": robust_limits(coarsest(levels), *STD_PERCENTILES),
    } | kwargs
    return (layer[0], kw, "image")


def family_layers(samples: Any, mean: Any, std: Any, name: str, voxel_size: float,
                  origin: Sequence[float] = (0.0, 0.0, 0.0),
                  info: dict[str, Any] | None = None) -> list[LayerData]:
    """Samples (S, Z, Y, X: a slider over S), mean and std layers of a posterior family.

    `samples` may be an array or a list of pyramid levels, or None when only the mean and
    std exist. The samples start hidden, the mean shows, the std lies over it.
    """
    extra = {"family": info or {}}
    out = []
    if samples is not None:
        levels = _levels(samples)
        if levels[0].ndim != 4:
            raise ValueError(f"family samples must be (S, Z, Y, X), got {levels[0].shape}")
        out.append(volume_layer(samples, f"{name} samples", voxel_size, origin,
                                kind="samples", extra=extra, visible=False))
    if mean is not None:
        out.append(volume_layer(mean, f"{name} mean", voxel_size, origin, kind="mean",
                                extra=extra))
    if std is not None:
        out.append(std_layer(std, f"{name} std", voxel_size, origin, extra=extra))
    return out


def fourier_layers(raw: Any, restored: Any, name: str, voxel_size: float,
                   tilt_axis: str = "y", offset: float = 0.0,
                   labels: tuple[str, str] = ("raw", "restored")) -> list[LayerData]:
    """log |F| of the central section through the missing wedge (ky = 0 for tilt axis Y:
    an XZ image) of `raw` and `restored`, as two 2D layers side by side.

    Both share one set of contrast limits (from the raw section) so the filled-in wedge
    shows as the difference. They are laid out along X starting at `offset` (Angstrom),
    at the tomogram's voxel size so they match it in size on the canvas.
    """
    sections = [fourier_section(raw, tilt_axis), fourier_section(restored, tilt_axis)]
    limits = robust_limits(sections[0][None], 1.0, 99.9)
    v = float(voxel_size)
    width = sections[0].shape[1] * v
    gap = 0.05 * width
    plane = "XZ (ky = 0)" if tilt_axis == "y" else "YZ (kx = 0)"
    out = []
    for i, (sec, label) in enumerate(zip(sections, labels, strict=True)):
        out.append((sec, {
            "name": f"{name} |F| {label}", "colormap": "viridis", "contrast_limits": limits,
            "scale": (v, v), "translate": (0.0, offset + i * (width + gap)),
            "metadata": _meta("fourier", v, {"plane": plane, "of": label}),
        }, "image"))
    return out

