"""The work behind the dock widget, free of Qt: take a layer's tomogram, load a
checkpoint, restore or sample with the library, and return layer data tuples.

These functions run in a napari worker thread; they report through a
`ThreadProgress`, which the widget polls from the GUI thread. Cancel calls the
reporter's `cancel`: the library stops at its next check, and the job raises
`cryowae.progress.Cancelled`. Everything but parsing the panel's text lives in the
library: the model cache (`cryowae.models.cache`), the voxel-size warning
(`cryowae.inference.restore`), the tilt geometry (`cryowae.physics.geometry`).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryowae.errors import CryowaeInputError
from cryowae.physics.geometry import TiltGeometry
from cryowae.progress import ProgressReporter

from ._layers import LayerData, family_layers, fourier_layers, volume_layer

if TYPE_CHECKING:
    from cryowae.models.checkpoint import LoadedRestorer

#: the tilt-axis choices of the panel ("model": the restorer's training axis)
AXIS_CHOICES = ("model", "y", "x")
#: the sampler choices of the panel ("auto": `cryowae.sampling.samplers.resolve_sampler`)
SAMPLER_CHOICES = ("auto", "prior", "rotations")
_RANGE = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*(?:,|\.\.|\s)\s*([-+]?\d+(?:\.\d*)?)\s*$")


class ThreadProgress(ProgressReporter):
    """A reporter written by the worker thread and read by the GUI thread."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._messages: deque[str] = deque()

    def start(self, total: int, description: str = "", done: int = 0) -> None:
        with self._lock:
            super().start(total, description, done)

    def advance(self, n: int = 1, **info: Any) -> None:
        with self._lock:
            super().advance(n, **info)

    def log(self, message: str) -> None:
        with self._lock:
            self._messages.append(str(message))

    def snapshot(self) -> tuple[int, int, str]:
        """(done, total, description) as of now."""
        with self._lock:
            return self.done, self.total, self.description

    def pop_messages(self) -> list[str]:
        with self._lock:
            out = list(self._messages)
            self._messages.clear()
        return out


@dataclass
class JobInput:
    """A tomogram taken from a layer: level-0 data, its name and geometry (Angstrom)."""

    data: Any
    name: str
    voxel_size: float
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    meta: dict[str, Any] = field(default_factory=dict)


def input_from_layer(layer: Any) -> JobInput:
    """The tomogram an image layer shows (finest level of a pyramid), or a clear error."""
    if layer is None:
        raise CryowaeInputError("choose a tomogram layer first (open an MRC file, or "
                                "File > Open Sample > cryowae)")
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if getattr(data, "ndim", 0) != 3:
        raise CryowaeInputError(
            f"layer {layer.name!r} has shape {tuple(data.shape)}: restoration needs a 3D "
            "(Z, Y, X) tomogram")
    meta = dict(getattr(layer, "metadata", {}).get("cryowae", {}))
    voxel = float(meta.get("voxel_size") or layer.scale[-1])
    origin = tuple(float(t) for t in layer.translate[-3:])
    return JobInput(data=data, name=layer.name, voxel_size=voxel, origin=origin,  # type: ignore[arg-type]
                    meta=meta)


def load_checkpoint(path: str | Path | None) -> LoadedRestorer:
    """The restorer of `path` (model.pt or a run directory) on the best device, loaded
    once per process (`cryowae.models.cache.cached_restorer`)."""
    if path is None or not str(path).strip() or str(path) == ".":
        raise CryowaeInputError("choose a checkpoint file (model.pt of a training run) first")
    from cryowae.devices import resolve_device
    from cryowae.models.cache import cached_restorer

    return cached_restorer(path, str(resolve_device("auto")))


def tilt_geometry(text: str, axis: str, restorer: LoadedRestorer) -> TiltGeometry:
    """The panel's tilt settings as a `TiltGeometry`.

    `text` is blank (the restorer's training range), ``MIN,MAX`` (or ``MIN..MAX``, in
    degrees) or the path of a .tlt/.rawtlt file; `axis` is one of `AXIS_CHOICES`.
    """
    if axis not in AXIS_CHOICES:
        raise CryowaeInputError(f"unknown tilt axis {axis!r}: choose from "
                                f"{', '.join(AXIS_CHOICES)}")
    ax = None if axis == "model" else axis
    text = (text or "").strip()
    match = _RANGE.match(text)
    if not text:
        return TiltGeometry.resolve(axis=ax, fallback=restorer.geometry)
    if match:
        return TiltGeometry.resolve(tilt_min=float(match[1]), tilt_max=float(match[2]),
                                    axis=ax, fallback=restorer.geometry)
    if not Path(text).is_file():
        raise CryowaeInputError(f"tilt range {text!r}: give MIN,MAX in degrees or a "
                                ".tlt/.rawtlt file")
    return TiltGeometry.resolve(tilt_file=text, axis=ax, fallback=restorer.geometry)


def check_compatible(restorer: LoadedRestorer, inp: JobInput, geometry: TiltGeometry,
                     progress: ProgressReporter) -> None:
    """Refuse volumes the restorer cannot take; warn on a voxel-size or tilt-axis
    mismatch (the library's warning)."""
    from cryowae.inference.restore import voxel_size_warning

    multiple = int(getattr(restorer.model, "multiple", 1))
    if min(int(s) for s in inp.data.shape) < multiple:
        raise CryowaeInputError(
            f"layer {inp.name!r} ({'x'.join(map(str, inp.data.shape))}) is smaller than the "
            f"restorer's minimum of {multiple} voxels per axis")
    warning = voxel_size_warning(inp.voxel_size, restorer.voxel_size)
    if warning:
        progress.log(warning)
    if geometry.axis != restorer.geometry.axis:
        progress.log(f"warning: the restorer was trained on tilt axis "
                     f"{restorer.geometry.axis.upper()}, the tomogram is tilted about "
                     f"{geometry.axis.upper()}; its missing wedge will not be filled well")


def _fourier_offset(inp: JobInput) -> float:
    """Where the Fourier pair starts along X: just right of the tomogram (Angstrom)."""
    width = int(inp.data.shape[-1]) * inp.voxel_size
    return inp.origin[-1] + 1.1 * width


def restore_job(checkpoint: str | Path, inp: JobInput,
                progress: ProgressReporter | None = None, tile: int = 96,
                overlap: int = 32, batch_size: int = 4, tilt: str = "",
                tilt_axis: str = "model") -> list[LayerData]:
    """Restore the tomogram: the restored volume plus the raw vs. restored Fourier pair
    (sections through the missing wedge of the tilt geometry `tilt`, `tilt_axis`)."""
    from cryowae.inference.restore import restore_array

    prog = progress if progress is not None else ThreadProgress()
    restorer = load_checkpoint(checkpoint)
    geometry = tilt_geometry(tilt, tilt_axis, restorer)
    check_compatible(restorer, inp, geometry, prog)
    out = restore_array(restorer, inp.data, tile=tile, overlap=overlap,
                        batch_size=batch_size, progress=prog)
    prog.check_cancelled("restoration")
    extra = {"source_layer": inp.name, "checkpoint": str(checkpoint),
             "geometry": geometry.to_dict()}
    layers = [volume_layer(out, f"{inp.name} restored", inp.voxel_size, inp.origin,
                           kind="restored", extra=extra)]
    layers += fourier_layers(inp.data, out, inp.name, inp.voxel_size,
                             tilt_axis=geometry.axis, offset=_fourier_offset(inp))
    return layers


def sample_job(checkpoint: str | Path, inp: JobInput, n_samples: int = 8,
               sampler: str = "auto", progress: ProgressReporter | None = None,
               tile: int = 96, overlap: int = 32, batch_size: int = 4,
               seed: int = 0, tilt: str = "", tilt_axis: str = "model") -> list[LayerData]:
    """Sample a posterior family with the library's sampler (`sample_array`): samples
    (slider over S), mean and std overlay layers. `sampler` ``auto`` draws from the
    model's stochastic branch, or test-time rotations for a model without one (said
    through `progress`). The tilt range (`tilt`) sets the measured region of the
    consistency check."""
    from cryowae.sampling.family import sample_array
    from cryowae.sampling.samplers import resolve_sampler
    from cryowae.sampling.settings import SamplerSettings
    from cryowae.tiling.settings import TileSettings

    prog = progress if progress is not None else ThreadProgress()
    restorer = load_checkpoint(checkpoint)
    geometry = tilt_geometry(tilt, tilt_axis, restorer)
    check_compatible(restorer, inp, geometry, prog)
    if geometry.axis != restorer.geometry.axis:
        raise CryowaeInputError(
            f"sampling uses the restorer's tilt axis ({restorer.geometry.axis.upper()}); "
            f"for a tomogram tilted about {geometry.axis.upper()} train on such data")
    if n_samples < 2:
        raise CryowaeInputError("a family needs at least 2 samples")
    sampler, note = resolve_sampler(sampler, restorer)
    if note:
        prog.log(note)
    if sampler == "rotations" and n_samples > 24:
        prog.log(f"test-time rotations give at most 24 samples: sampling 24, not "
                 f"{n_samples}")
        n_samples = 24
    sampling = SamplerSettings(int(n_samples), sampler,
                               TileSettings(tile, overlap, batch_size), int(seed))
    fam = sample_array(restorer, inp.data, sampling, prog, geometry=geometry)
    prog.check_cancelled("sampling")
    info = dict(fam.info) | {"source_layer": inp.name, "checkpoint": str(checkpoint)}
    layers = family_layers(fam.samples, fam.mean, fam.std, inp.name, inp.voxel_size,
                           inp.origin, info)
    # in the widget the samples are what was asked for: show them, the mean stays hidden
    for layer in layers:
        kw = layer[1]
        kw["visible"] = kw["metadata"]["cryowae"]["kind"] in ("samples", "std")
    return layers
