"""Settings and block geometry of `restore-batch`.

A tomogram's output is cut into *blocks*: chunk-aligned cores of ``block`` voxels per
axis (the last block of an axis may be shorter), restored by independent tasks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryowae.errors import CryowaeInputError
from cryowae.tiling.plan import TilePlan
from cryowae.tiling.settings import TileSettings

#: folder of per-block marker files inside a partial store
DONE_DIR = ".cryowae_done"
PARTIAL_SUFFIX = ".partial"
#: group attribute holding the run's settings and normalisation
ATTR = "cryowae_batch"
#: bump when the block layout or the arithmetic changes: older partial stores restart
FORMAT = 1

Core = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class BatchSettings:
    """How every tomogram of a batch is restored (validated when made).

    Attributes
    ----------
    model
        Path of ``model.pt`` (absolute: workers may start elsewhere).
    tiles
        Tile settings of the (whole-tomogram) tile plan.
    block
        Edge of a block's core (voxels), a multiple of `out_chunk`.
    chunk
        Output zarr chunk edge; None: 64 when it divides the block, else the block.
    levels
        OME-Zarr pyramid levels.
    mrc, overwrite
        Also write NAME.mrc; replace finished outputs.
    """

    model: str
    tiles: TileSettings = field(default_factory=TileSettings)
    block: int = 256
    chunk: int | None = None
    levels: int = 3
    mrc: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.block < 8:
            raise CryowaeInputError(f"--block must be >= 8 voxels, got {self.block}")
        if self.out_chunk < 1 or self.block % self.out_chunk:
            raise CryowaeInputError(f"--block {self.block} must be a multiple of the output "
                                    f"chunk {self.out_chunk}")
        if self.levels < 1:
            raise CryowaeInputError(f"--levels must be >= 1, got {self.levels}")

    @property
    def out_chunk(self) -> int:
        """Edge of the output zarr chunks: `chunk`, else 64 when it divides the block,
        else the block itself."""
        if self.chunk:
            return int(self.chunk)
        return 64 if self.block % 64 == 0 else int(self.block)


def block_grid(shape: Sequence[int], block: int) -> list[Core]:
    """Cores ``((z0, z1), (y0, y1), (x0, x1))`` of the blocks of a volume, z-major."""
    ranges = [[(s, min(s + block, n)) for s in range(0, n, block)] for n in shape]
    return [tuple(c) for c in itertools.product(*ranges)]  # type: ignore[misc]


def block_id(core: Sequence[tuple[int, int]], block: int) -> str:
    """Marker name of a block: ``z{i}-y{j}-x{k}`` (its index in the block grid)."""
    return "-".join(f"{a}{c[0] // block}" for a, c in zip("zyx", core, strict=True))


def block_overhead(shape: Sequence[int], block: int, plan: TilePlan) -> float:
    """Tiles restored by all blocks over tiles of one pass (>= 1): a block restores every
    tile of the whole tomogram's plan that overlaps its core, so tiles that overlap
    several blocks are restored once per block."""
    total = 1.0
    for n_ax, ax in zip(shape, plan.axes, strict=True):
        n = sum(len(ax.overlapping(c0, min(c0 + block, n_ax))) for c0 in range(0, n_ax, block))
        total *= n / len(ax.starts)
    return total


__all__ = [
    "ATTR", "DONE_DIR", "FORMAT", "PARTIAL_SUFFIX", "BatchSettings", "Core", "block_grid",
    "block_id", "block_overhead",
]
