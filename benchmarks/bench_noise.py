"""Noise estimates on every pipeline of the simulator (issue 21): how close do the
data's noise estimates come to the exact noise power per shell of the measured region?

    OMP_NUM_THREADS=1 python benchmarks/bench_noise.py --seed 41

For each pipeline (`cryowae.simulation.pipelines.PIPELINES`): a scene `--specimen` voxels
thick (`make_scene`, the seed's scene generator) is placed in the middle of a tomogram
`--thickness` voxels thick (empty slabs above and below, as real tomograms are
reconstructed), recorded and reconstructed by `run_pipeline` with the seed's noise, and
again without noise (``SimulationConfig.noise=False``: same scene, same pipeline). The
exact noise is tomo - noiseless tomo (every reconstruction is linear in the images).
On the central `--column` x `--column` voxels in Y, X (all Z planes: near the Z faces
the edge of a narrow field of view drops high-tilt rays), per shell of the measured
region, the ratio estimate / exact of:

- ramp: `noise_without_halves` (power above 0.35 cycles/voxel as a |k|);
- slabs: `noise_from_empty_slabs` (the empty Z slabs);
- halves: `noise_of_data` with the even/odd halves (`noise_from_halves`, c fitted).

Printed per pipeline: median and worst (farthest from 1 in log) ratio over the shells
with signal (noiseless power >= `--signal` x exact noise power, 0.03-0.5 cycles/voxel),
and over all shells 0.03-0.5.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import torch


def simulate_pair(name: str, seed: int, size: int, thickness: int, specimen: int
                  ) -> dict[str, torch.Tensor]:
    """tomo, halves and the noiseless tomo of pipeline `name` with empty Z slabs."""
    from cryowae.simulation.config import SimulationConfig
    from cryowae.simulation.phantom import make_scene
    from cryowae.simulation.pipelines import get_pipeline, run_pipeline, scene_config
    from cryowae.simulation.simulate import _seeds

    pipe = get_pipeline(name)
    cfg = SimulationConfig(size=size, thickness=thickness, seed=seed)
    grid = scene_config(cfg, pipe)
    zf = grid.shape[0]
    zs = specimen * zf // thickness
    rng, noise_gen = _seeds(seed)
    scene = make_scene((zs, *grid.shape[1:]), float(grid.voxel_size), rng,
                       n_species=grid.n_species, crowding=grid.crowding,
                       vesicle=grid.vesicle, filament=grid.filament)
    below = (zf - zs) // 2
    gt = torch.nn.functional.pad(scene.volume, (0, 0, 0, 0, below, zf - zs - below))
    noisy, _ = run_pipeline(gt, cfg, pipe, noise_gen)
    clean, _ = run_pipeline(gt, dataclasses.replace(cfg, noise=False), pipe,
                            torch.Generator().manual_seed(0))
    return {"tomo": noisy["tomo"], "even": noisy["tomo_even"], "odd": noisy["tomo_odd"],
            "clean": clean["tomo"]}


def ratios(vols: dict[str, torch.Tensor], column: int, signal: float
           ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, str]:
    """Per-shell ratio estimate / exact of each estimate, the shells with signal, all
    shells 0.03-0.5, and the slab estimate's source."""
    from cryowae.metrics.calibration import shell_frequencies
    from cryowae.physics.crop import central_box
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.consistency import noise_of_data
    from cryowae.training.noise import measured_shell_power, noise_without_halves
    from cryowae.training.slab_noise import noise_from_empty_slabs

    z = vols["tomo"].shape[0]
    box = (slice(0, z), *central_box(vols["tomo"].shape, column, even=True)[1:])
    v = {k: t[box].contiguous() for k, t in vols.items()}
    geo = TiltGeometry(-60.0, 60.0, "y", "simulation")
    exact, count = measured_shell_power(v["tomo"] - v["clean"], geo)
    sig, _ = measured_shell_power(v["clean"], geo)
    slabs = noise_from_empty_slabs(v["tomo"], geo)
    est = {"ramp": noise_without_halves(v["tomo"], geo).power, "slabs": slabs.power,
           "halves": noise_of_data(v["tomo"], geo, v["even"], v["odd"]).power}
    freq = shell_frequencies(v["tomo"].shape)
    band = (freq >= 0.03) & (freq <= 0.5) & (count > 0) & (exact > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: e / exact for k, e in est.items()}
    return out, band & (sig >= signal * exact), band, slabs.source


def summary(r: np.ndarray, sel: np.ndarray) -> str:
    """median / worst (farthest from 1 in log) of `r` over `sel`."""
    x = r[sel]
    if x.size == 0:
        return "n/a"
    worst = x[int(np.argmax(np.abs(np.log(np.maximum(x, 1e-12)))))]
    return f"{np.median(x):.2f} / {worst:.2f}"


def main() -> None:
    from cryowae.simulation.pipelines import PIPELINES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--size", type=int, default=96, help="Y and X voxels")
    ap.add_argument("--thickness", type=int, default=64, help="tomogram Z voxels")
    ap.add_argument("--specimen", type=int, default=32, help="specimen Z voxels (centred)")
    ap.add_argument("--column", type=int, default=64, help="central Y, X box analysed")
    ap.add_argument("--signal", type=float, default=0.01,
                    help="a shell has signal when noiseless power >= this x noise power")
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"seed {a.seed}, tomogram {a.thickness}x{a.size}x{a.size} (Z, Y, X), specimen "
          f"{a.specimen} planes centred, central {a.column}x{a.column} column, all Z; "
          "ratio estimate / exact noise power per shell of the measured region, "
          "median / worst shell")
    print("| pipeline | shells with signal | ramp fit | empty slabs | halves | "
          "all shells: ramp | slabs | halves | slab source | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in a.pipelines:
        t0 = time.perf_counter()
        vols = simulate_pair(name, a.seed, a.size, a.thickness, a.specimen)
        r, sig, band, source = ratios(vols, a.column, a.signal)
        cells = [summary(r[k], sig) for k in ("ramp", "slabs", "halves")]
        cells += [summary(r[k], band) for k in ("ramp", "slabs", "halves")]
        print(f"| {name} | {int(sig.sum())} | " + " | ".join(cells) +
              f" | {source} | {time.perf_counter() - t0:.0f} |", flush=True)
    print("\ncommand: OMP_NUM_THREADS=1 python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
