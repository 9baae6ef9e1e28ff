"""The work behind the dock widget, free of Qt: take a layer's tomogram, load a
checkpoint, restore or sample with the library, and return layer data tuples.

These functions run in a napari worker thread; they report through a
`ThreadProgress`, which the widget polls from the GUI thread, and stop when its
`cancelled` flag is set (the library checks it between tiles).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryowae.errors import CryowaeInputError
from cryowae.progress import ProgressReporter

from ._layers import LayerData, family_layers, fourier_layers, volume_layer

#: relative voxel-size mismatch (layer vs. training data) above which a warning is shown
VOXEL_TOLERANCE = 0.1


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


_cache: dict[tuple[str, float], Any] = {}
_cache_lock = threading.Lock()


def load_checkpoint(path: str | Path | None) -> Any:
    """`load_restorer` on the best device, cached by path and modification time."""
    if path is None or not str(path).strip() or str(path) == ".":
        raise CryowaeInputError("choose a checkpoint file (model.pt of a training run) first")
    p = Path(path)
    if p.is_dir():
        p = p / "model.pt"
    if not p.is_file():
        raise CryowaeInputError(f"{p}: no such checkpoint file")
    from cryowae.devices import resolve_device
    from cryowae.models.checkpoint import load_restorer

    key = (str(p.resolve()), p.stat().st_mtime)
    with _cache_lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = load_restorer(p, resolve_device("auto"))
        return _cache[key]


def check_compatible(restorer: Any, inp: JobInput, progress: ProgressReporter) -> None:
    """Refuse volumes the restorer cannot take; warn on a voxel-size mismatch."""
    multiple = int(getattr(restorer.model, "multiple", 1))
    if min(int(s) for s in inp.data.shape) < multiple:
        raise CryowaeInputError(
            f"layer {inp.name!r} ({'x'.join(map(str, inp.data.shape))}) is smaller than the "
            f"restorer's minimum of {multiple} voxels per axis")
    v_model = float(restorer.voxel_size)
    if v_model > 0 and abs(inp.voxel_size - v_model) > VOXEL_TOLERANCE * v_model:
        progress.log(f"warning: layer {inp.name!r} has voxel size {inp.voxel_size:g} A, the "
                     f"restorer was trained at {v_model:g} A; results may be poor "
                     "(rescale the tomogram to match)")


def _fourier_offset(inp: JobInput) -> float:
    """Where the Fourier pair starts along X: just right of the tomogram (Angstrom)."""
    width = int(inp.data.shape[-1]) * inp.voxel_size
    return inp.origin[-1] + 1.1 * width


def restore_job(checkpoint: str | Path, inp: JobInput,
                progress: ProgressReporter | None = None, tile: int = 96,
                overlap: int = 32, batch_size: int = 4) -> list[LayerData]:
    """Restore the tomogram: the restored volume plus the raw vs. restored Fourier pair."""
    from cryowae.inference.restore import restore_array

    prog = progress if progress is not None else ThreadProgress()
    restorer = load_checkpoint(checkpoint)
    check_compatible(restorer, inp, prog)
    out = restore_array(restorer, inp.data, tile=tile, overlap=overlap,
                        batch_size=batch_size, progress=prog)
    if prog.cancelled:
        raise JobCancelled()
    extra = {"source_layer": inp.name, "checkpoint": str(checkpoint)}
    layers = [volume_layer(out, f"{inp.name} restored", inp.voxel_size, inp.origin,
                           kind="restored", extra=extra)]
    layers += fourier_layers(inp.data, out, inp.name, inp.voxel_size,
                             tilt_axis=str(restorer.tilt_axis), offset=_fourier_offset(inp))
    return layers


def sample_job(checkpoint: str | Path, inp: JobInput, n_samples: int = 8,
               epsilon: float = 0.5, progress: ProgressReporter | None = None,
               tile: int = 96, overlap: int = 32, batch_size: int = 4,
               seed: int = 0) -> list[LayerData]:
    """Sample a posterior family: samples (slider over S), mean and std overlay layers."""
    from cryowae.sampling.family import sample_array

    prog = progress if progress is not None else ThreadProgress()
    restorer = load_checkpoint(checkpoint)
    check_compatible(restorer, inp, prog)
    if n_samples < 2:
        raise CryowaeInputError("a family needs at least 2 samples")
    if not epsilon > 0:
        raise CryowaeInputError(f"epsilon must be positive, got {epsilon:g}")
    fam = sample_array(restorer, inp.data, n_samples=int(n_samples), epsilon=float(epsilon),
                       tile=tile, overlap=overlap, batch_size=batch_size, seed=seed,
                       progress=prog)
    if prog.cancelled:
        raise JobCancelled()
    info = dict(fam.info) | {"source_layer": inp.name, "checkpoint": str(checkpoint)}
    layers = family_layers(fam.samples, fam.mean, fam.std, inp.name, inp.voxel_size,
                           inp.origin, info)
    # in the widget the samples are what was asked for: show them, the mean stays hidden
    for layer in layers:
        kw = layer[1]
        kw["visible"] = kw["metadata"]["cryowae"]["kind"] in ("samples", "std")
    return layers


class JobCancelled(RuntimeError):
    """The user pressed Cancel; nothing was added."""
