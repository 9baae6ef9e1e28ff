"""`TileSettings`: how a volume is cut into tiles, validated once when it is made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryowae.errors import CryowaeInputError
from cryowae.tiling.plan import WINDOWS, TilePlan, plan_tiles, round_up


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise CryowaeInputError(f"--{name} must be a whole number, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class TileSettings:
    """Tile edge, overlap, batch size and blending window of a tiled pass.

    Attributes
    ----------
    tile
        Tile edge in voxels (before rounding up to the network's multiple, see
        `resolved_tile`).
    overlap
        Minimum overlap of neighbouring tiles in voxels, ``0 <= overlap < tile``.
    batch_size
        Tiles per forward pass (halved by the engine on out-of-memory errors).
    window
        Blending window: ``cosine`` (default), ``gaussian`` or ``flat`` (no blending,
        for comparisons).

    Bad values raise `CryowaeInputError` naming the command-line option, e.g.
    ``--overlap 40 must be smaller than the tile (32)``.
    """

    tile: int = 96
    overlap: int = 32
    batch_size: int = 4
    window: str = "cosine"

    def __post_init__(self) -> None:
        tile, overlap = _as_int("tile", self.tile), _as_int("overlap", self.overlap)
        batch = _as_int("batch-size", self.batch_size)
        if tile < 1:
            raise CryowaeInputError(f"--tile must be positive, got {tile}")
        if overlap < 0:
            raise CryowaeInputError(f"--overlap must be >= 0, got {overlap}")
        if overlap >= tile:
            raise CryowaeInputError(f"--overlap {overlap} must be smaller than the tile "
                                    f"({tile})")
        if batch < 1:
            raise CryowaeInputError(f"--batch-size must be >= 1, got {batch}")
        if self.window not in WINDOWS:
            raise CryowaeInputError(f"--window {self.window!r}: choose one of "
                                    f"{', '.join(WINDOWS)}")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "batch_size", batch)

    def resolved_tile(self, multiple: int) -> int:
        """The tile edge actually used: `tile` rounded up to a multiple of `multiple` (the
        network's size multiple, ``model.multiple``)."""
        return round_up(self.tile, max(1, int(multiple)))

    def rounding_note(self, multiple: int) -> str | None:
        """The message telling the user that the tile was rounded up, or None."""
        t = self.resolved_tile(multiple)
        if t == self.tile:
            return None
        return (f"tile {self.tile} rounded up to {t} (the restorer needs a multiple of "
                f"{int(multiple)})")

    def plan(self, shape: Sequence[int], multiple: int) -> TilePlan:
        """The tile plan (`cryowae.tiling.plan.plan_tiles`) of a (Z, Y, X) volume."""
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3:
            raise CryowaeInputError(f"expected a 3D (Z, Y, X) volume, got shape {shape}")
        if min(shape) < 1:
            raise CryowaeInputError(f"empty volume of shape {shape}")
        m = max(1, int(multiple))
        return plan_tiles(shape, self.resolved_tile(m), self.overlap, m, self.window)


__all__ = ["TileSettings"]
