"""Tiled passes over whole volumes: the plan (`plan`), its settings (`settings`) and the
one tile loop (`engine.run_tiles`) that restoration, restore-batch, refill and sampling
run on."""

from cryowae.tiling.engine import (
    TileFn,
    TileRef,
    TileRunner,
    array_sink,
    iter_slabs,
    model_tile_fn,
    run_tiles,
)
from cryowae.tiling.pages import page_releasing, release_pages
from cryowae.tiling.plan import WINDOWS, AxisPlan, TilePlan, core_tiles, plan_tiles
from cryowae.tiling.settings import TileSettings

__all__ = [
    "WINDOWS", "AxisPlan", "TileFn", "TilePlan", "TileRef", "TileRunner", "TileSettings",
    "array_sink", "core_tiles", "iter_slabs", "model_tile_fn", "page_releasing",
    "plan_tiles", "release_pages", "run_tiles",
]
