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
and over those from `--resolved` cycles/voxel up (a slab of L planes does not resolve
kz below about 2 / L: 0.12 for the 17-plane slabs here). ``leak``: the slab estimate
of the noiseless tomogram (same slabs) over the exact noise, median of the three lowest
shells with signal: the specimen's signal that reaches into the slabs.

    OMP_NUM_THREADS=1 python benchmarks/bench_noise.py --real

The real EMPIAR-10164 tomogram (no truth, no halves): the slabs found and, per shell of
the central 96 x 96 column (all Z), the slab estimate over the ramp fit and over the
column's measured power (noise cannot exceed it).

    OMP_NUM_THREADS=1 python benchmarks/bench_noise.py --default-sims 10 13 --size 128

The estimate `cryowae simulate`'s own tomograms get (the source line per seed).
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
    shells 0.03-0.5 (with exact noise), and the slab estimate's source."""
    from cryowae.metrics.calibration import shell_frequencies
    from cryowae.physics.crop import central_box
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.consistency import noise_of_data
    from cryowae.training.noise import measured_shell_power, noise_without_halves
    from cryowae.training.slab_noise import find_empty_slabs, noise_from_empty_slabs, slab_noise

    z = vols["tomo"].shape[0]
    box = (slice(0, z), *central_box(vols["tomo"].shape, column, even=True)[1:])
    v = {k: t[box].contiguous() for k, t in vols.items()}
    geo = TiltGeometry(-60.0, 60.0, "y", "simulation")
    exact, count = measured_shell_power(v["tomo"] - v["clean"], geo)
    sig, _ = measured_shell_power(v["clean"], geo)
    slabs = noise_from_empty_slabs(v["tomo"], geo)
    est = {"ramp": noise_without_halves(v["tomo"], geo).power, "slabs": slabs.power,
           "halves": noise_of_data(v["tomo"], geo, v["even"], v["odd"]).power}
    found = find_empty_slabs(v["tomo"])
    if not found.reason:  # the specimen's signal in the slabs: the noiseless tomogram's
        est["leak"] = slab_noise(v["clean"], found.slabs, geo)[0]
    freq = shell_frequencies(v["tomo"].shape)
    band = (freq >= 0.03) & (freq <= 0.5) & (count > 0) & (exact > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: e / exact for k, e in est.items()}
    return out, band & (sig >= signal * exact), band, slabs.source


def summary(r: np.ndarray, sel: np.ndarray, freq: np.ndarray) -> str:
    """median / worst (farthest from 1 in log) of `r` over `sel`, and the worst
    shell's frequency (cycles/voxel)."""
    x, f = r[sel], freq[sel]
    if x.size == 0:
        return "n/a"
    i = int(np.argmax(np.abs(np.log(np.maximum(x, 1e-12)))))
    return f"{np.median(x):.2f} / {x[i]:.2f} @{f[i]:.2f}"


def real(every: int) -> None:
    """The slab estimate on the EMPIAR-10164 tomogram against the ramp fit."""
    from cryowae.data.samples import empiar_10164
    from cryowae.io import read_volume
    from cryowae.physics.crop import central_box
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.training.noise import measured_shell_power, noise_without_halves
    from cryowae.training.slab_noise import column_of, noise_from_empty_slabs

    sample = empiar_10164()
    with read_volume(sample.tomogram) as v:
        data = np.array(v.numpy(), dtype=np.float32)
    col = column_of(data, central_box(data.shape, 96, even=True))
    geo = TiltGeometry(*sample.tilt_range, "y", "EMPIAR-10164")
    slabs = noise_from_empty_slabs(col, geo)
    ramp = noise_without_halves(col, geo)
    total, _ = measured_shell_power(col, geo)
    print(f"EMPIAR-10164, column {tuple(col.shape)}: {slabs.source}")
    print("| cycles/voxel | slabs / ramp fit | slabs / measured power |")
    print("|---|---|---|")
    for i in range(2, len(slabs.frequency), every):
        print(f"| {slabs.frequency[i]:.3f} | {slabs.power[i] / ramp.power[i]:.2f} | "
              f"{slabs.power[i] / total[i]:.2f} |")


def default_sims(seeds: list[int], size: int) -> None:
    """Which estimate `cryowae simulate`'s own tomograms (specimen through the whole
    slab) get: the source line per seed."""
    from cryowae.simulation.config import SimulationConfig
    from cryowae.simulation.simulate import simulate_tomogram
    from cryowae.training.slab_noise import noise_from_empty_slabs

    for seed in seeds:
        cfg = SimulationConfig(size=size, seed=seed)
        tomo = simulate_tomogram(cfg)["tomo"]
        print(f"seed {seed}, {tuple(tomo.shape)}: "
              f"{noise_from_empty_slabs(tomo, cfg.geometry).source}")


def main() -> None:
    from cryowae.metrics.calibration import shell_frequencies
    from cryowae.simulation.pipelines import PIPELINES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=41)
    ap.add_argument("--size", type=int, default=96, help="Y and X voxels")
    ap.add_argument("--thickness", type=int, default=64, help="tomogram Z voxels")
    ap.add_argument("--specimen", type=int, default=32, help="specimen Z voxels (centred)")
    ap.add_argument("--column", type=int, default=64, help="central Y, X box analysed")
    ap.add_argument("--signal", type=float, default=0.01,
                    help="a shell has signal when noiseless power >= this x noise power")
    ap.add_argument("--resolved", type=float, default=0.1,
                    help="second summary: shells with signal from this frequency up")
    ap.add_argument("--pipelines", nargs="+", default=list(PIPELINES))
    ap.add_argument("--real", action="store_true",
                    help="the EMPIAR-10164 tomogram instead of the pipelines")
    ap.add_argument("--every", type=int, default=5, help="--real: every n-th shell")
    ap.add_argument("--default-sims", type=int, nargs="+", metavar="SEED",
                    help="the source line of `cryowae simulate --size SIZE` tomograms")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.default_sims:
        default_sims(a.default_sims, a.size)
        print("\ncommand: OMP_NUM_THREADS=1 python " + " ".join(sys.argv))
        return
    if a.real:
        real(a.every)
        print("\ncommand: OMP_NUM_THREADS=1 python " + " ".join(sys.argv))
        return
    print(f"seed {a.seed}, tomogram {a.thickness}x{a.size}x{a.size} (Z, Y, X), specimen "
          f"{a.specimen} planes centred, central {a.column}x{a.column} column, all Z; "
          "ratio estimate / exact noise power per shell of the measured region, "
          "median / worst shell @ its cycles/voxel")
    print("| pipeline | shells with signal | ramp fit | empty slabs | halves | "
          f">= {a.resolved:g} cycles/voxel: ramp | slabs | halves | leak | slab source | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in a.pipelines:
        t0 = time.perf_counter()
        vols = simulate_pair(name, a.seed, a.size, a.thickness, a.specimen)
        r, sig, band, source = ratios(vols, a.column, a.signal)
        freq = shell_frequencies((a.thickness, a.column, a.column))
        cells = [summary(r[k], sig, freq) for k in ("ramp", "slabs", "halves")]
        high = sig & (freq >= a.resolved)
        cells += [summary(r[k], high, freq) for k in ("ramp", "slabs", "halves")]
        low = np.flatnonzero(sig)[:3]  # the three lowest shells with signal
        cells.append(f"{np.median(r['leak'][low]):.2f}" if "leak" in r else "n/a")
        print(f"| {name} | {int(sig.sum())} | " + " | ".join(cells) +
              f" | {source} | {time.perf_counter() - t0:.0f} |", flush=True)
    print("\ncommand: OMP_NUM_THREADS=1 python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
