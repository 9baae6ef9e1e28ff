"""Sample data: a small simulated tomogram with its ground truth.

Made once with cryowae's simulator and cached (``$CRYOWAE_CACHE_DIR``, else
``$XDG_CACHE_HOME/cryowae`` or ``~/.cache/cryowae``), so later calls are instant.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._layers import LayerData
from ._reader import read_mrc_layer

SIZE = 64
SEED = 0
VOXEL_SIZE = 10.0


def cache_dir() -> Path:
    root = os.environ.get("CRYOWAE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cryowae"


def simulated_dir(size: int = SIZE, seed: int = SEED) -> Path:
    """The cached simulation folder (tomo.mrc, gt.mrc, halves, meta.json), made on first
    use. The simulator writes it atomically, so a killed first call leaves no half."""
    target = cache_dir() / "sample_data" / f"sim{size}_seed{seed}_v{VOXEL_SIZE:g}A"
    if (target / "tomo.mrc").is_file() and (target / "gt.mrc").is_file():
        return target
    from cryowae.simulation import SimulationConfig, write_simulation

    target.parent.mkdir(parents=True, exist_ok=True)
    write_simulation(target, SimulationConfig(size=size, seed=seed, voxel_size=VOXEL_SIZE),
                     overwrite=True)
    return target


def simulated_tomogram() -> list[LayerData]:
    """napari sample data: the simulated tomogram and its ground truth (hidden)."""
    d = simulated_dir(SIZE, SEED)
    tomo = read_mrc_layer(d / "tomo.mrc", name="simulated tomogram")
    gt = read_mrc_layer(d / "gt.mrc", name="simulated ground truth", kind="ground-truth")
    gt[1]["visible"] = False
    return [tomo, gt]
