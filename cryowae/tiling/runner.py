"""Running batches of tiles through a tile function: the function for restoration, the
batch size (from free GPU memory, halved on out-of-memory errors), window weighting.

`cryowae.tiling.engine` cuts the tiles and blends the outputs; this module only runs
them. Arrays are (B, tz, ty, tx) float32 tiles in normalised units; tensors passed to a
`TileFn` are (B, 1, tz, ty, tx) on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.devices import free_memory
from cryowae.errors import CryowaeInputError
from cryowae.models.protocol import Restorer
from cryowae.precision import ComputeSettings, autocast, prepare, to_layout
from cryowae.progress import ProgressReporter, ensure_progress
from cryowae.tiling.plan import TilePlan

Range = tuple[int, int]
Core = tuple[Range, Range, Range]

#: batch size of a restoration when none is given and the device has no memory reading
DEFAULT_BATCH_SIZE = 4
#: largest batch size chosen from free GPU memory
MAX_AUTO_BATCH = 64
#: share of the free GPU memory the chosen batch may fill (the rest: fragmentation)
AUTO_BATCH_FRACTION = 0.7


@dataclass(frozen=True)
class TileRef:
    """Where one tile of a `TilePlan` lies.

    Attributes
    ----------
    index
        (iz, iy, ix): position of the tile in the plan's grid (into ``axis.starts``).
    start
        (z, y, x) of the tile's first voxel in the plan's padded coordinates
        (``plan.axes[a].starts[index[a]]``); the tile spans ``start .. start + tile``.
    real
        ((z0, z1), (y0, y1), (x0, x1)): the real voxels the tile covers (end exclusive),
        the rest of the tile being reflect padding.
    """

    index: tuple[int, int, int]
    start: tuple[int, int, int]
    real: Core


#: ``fn(tiles (B, 1, tz, ty, tx) on the device, refs) -> (B, 1, tz, ty, tx)`` (or a tuple
#: whose first element is that tensor), in normalised units; the runner weights a float32
#: result in place unless it shares memory with the tiles, so a function returns a tensor
#: it does not keep
TileFn = Callable[[torch.Tensor, Sequence[TileRef]], Any]


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` lie in the same storage (a view of the other, or the same)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors and the CPU allocator's failures."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg
                                              or "can't allocate memory" in msg)  # CPU


def model_tile_fn(restorer: Restorer, compute: ComputeSettings | None = None,
                  log: Callable[[str], None] | None = None) -> TileFn:
    """The deterministic restoration tile function: ``restorer.model(x)`` under
    `torch.inference_mode`, with bfloat16 autocast where ``compute.amp`` turns it on
    (`cryowae.precision.amp_active`: CUDA by default, a CPU with bf16 instructions on
    request; float32 otherwise), in ``channels_last_3d`` and behind
    `torch.compile` when `compute` asks for them (`cryowae.precision`; a compile failure
    is reported through `log` and the model runs eagerly)."""
    compute = compute or ComputeSettings()
    device = torch.device(restorer.device)
    model = prepare(restorer.model, compute, log)

    def fn(x: torch.Tensor, refs: Sequence[TileRef]) -> Any:
        with torch.inference_mode(), autocast(device, compute.amp):
            return model(to_layout(x, compute.channels_last))

    return fn


def probe_ref(tile: tuple[int, int, int]) -> TileRef:
    """A `TileRef` for a tile at the origin (for probing a tile function's memory)."""
    return TileRef((0, 0, 0), (0, 0, 0), tuple((0, t) for t in tile))  # type: ignore[arg-type]


def batch_for_memory(fn: TileFn, tile: tuple[int, int, int], device: torch.device | str,
                     channels: int = 1) -> int | None:
    """Tiles per forward pass that fit the free memory of a CUDA `device`: one tile is run
    through `fn` to measure its peak memory (bytes above what was allocated before), and
    ``AUTO_BATCH_FRACTION`` of the free memory (`cryowae.devices.free_memory`) is divided
    by it, clipped to 1..`MAX_AUTO_BATCH`. None on devices without a memory reading
    (CPU). The engine still halves the batch on out-of-memory errors."""
    device = torch.device(device)
    if free_memory(device) is None:
        return None
    x = torch.zeros((1, 1, *tile), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        y = fn(x, [probe_ref(tile)])
    torch.cuda.synchronize(device)
    per_tile = max(1, torch.cuda.max_memory_allocated(device) - base)
    del y, x
    free = free_memory(device) or 0
    per_tile += 4 * int(np.prod(tile)) * max(1, channels)  # the weighted output
    return int(max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_FRACTION * free // per_tile)))


def resolve_batch_size(fn: TileFn, tile: tuple[int, int, int], device: torch.device | str,
                       requested: int | None, log: Callable[[str], None] | None = None,
                       channels: int = 1) -> int:
    """`requested` when given; else from free GPU memory (`batch_for_memory`, said
    through `log`), else `DEFAULT_BATCH_SIZE`."""
    if requested is not None:
        return int(requested)
    chosen = batch_for_memory(fn, tile, device, channels)
    if chosen is None:
        return DEFAULT_BATCH_SIZE
    if log is not None:
        free = (free_memory(device) or 0) / 2**30
        log(f"batch size {chosen} from {free:.1f} GiB free on {torch.device(device)}")
    return chosen


class TileRunner:
    """Runs batches of tiles through a `TileFn` and weights the outputs by the plan's
    window; halves the batch size on out-of-memory errors (and says so through
    `progress`). One runner may serve several passes (e.g. the two halves of a
    tomogram), which then share the batch size it has fallen back to."""

    def __init__(self, fn: TileFn, plan: TilePlan, device: torch.device | str,
                 batch_size: int, progress: ProgressReporter | None = None,
                 channels: int = 1) -> None:
        self.fn = fn
        self.channels = max(1, int(channels))
        self.device = torch.device(device)
        self.batch = max(1, int(batch_size))
        self.tile = plan.tile
        self.window = torch.from_numpy(plan.tile_window()).to(self.device)
        self.progress = ensure_progress(progress)

    def _forward(self, x: np.ndarray | torch.Tensor, refs: Sequence[TileRef]) -> np.ndarray:
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(x)
        t = t.to(self.device, non_blocking=True)[:, None]  # non-blocking from pinned memory
        with torch.inference_mode():
            y = self.fn(t, refs)
            if isinstance(y, tuple | list):
                y = y[0]
            if tuple(y.shape) != (len(x), self.channels, *self.tile):
                raise ValueError(f"tile function returned shape {tuple(y.shape)} for "
                                 f"tiles {(len(x), self.channels, *self.tile)}")
            y = y[:, 0] if self.channels == 1 else y
            if y.dtype == torch.float32 and not _shares_memory(y, t):
                y = y.mul_(self.window)  # in place: no second copy of a C-channel batch
            else:
                y = y.float() * self.window
        return y.cpu().numpy()

    def __call__(self, tiles: np.ndarray | torch.Tensor,
                 refs: Sequence[TileRef]) -> np.ndarray:
        """Weighted outputs (B, tz, ty, tx) float32 for normalised tiles (B, tz, ty, tx)
        (a numpy array, or a pinned CPU tensor); (B, C, tz, ty, tx) for a runner of
        C > 1 `channels`."""
        out, i = [], 0
        while i < len(tiles):
            n = min(self.batch, len(tiles) - i)
            try:
                out.append(self._forward(tiles[i:i + n], refs[i:i + n]))
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if n == 1:
                    shape = "x".join(str(s) for s in tiles.shape[1:])
                    raise CryowaeInputError(
                        f"out of memory restoring a single {shape} tile on {self.device}; "
                        "use a smaller --tile or --device cpu") from None
                self.batch = max(1, n // 2)
                self.progress.log(f"out of memory with batch {n}: fell back to batch "
                                  f"{self.batch}")
                continue
            i += n
        return np.concatenate(out) if len(out) > 1 else out[0]


__all__ = [
    "DEFAULT_BATCH_SIZE", "Core", "TileFn", "TileRef", "TileRunner", "batch_for_memory",
    "is_out_of_memory", "model_tile_fn", "resolve_batch_size",
]
