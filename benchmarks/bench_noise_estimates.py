"""Noise and error estimates against their exact values (issue 11): how well do the
data's noise estimates and the restoration-error estimates of the spread calibration
follow the truth, per resolution shell of the measured region?

    OMP_NUM_THREADS=1 python benchmarks/bench_noise_estimates.py --root /tmp/bfam10 \
        --seeds 10 11 12

For each seed of a bench_families output (``sim_seed{S}``, ``run_seed{S}_default``):
simulates the noise-free twin (`cryowae simulate --no-noise`, same seed, structures and
geometry: the same scene, so tomo - twin is the exact noise) and prints per shell:

- noise: exact, the ramp fit of `noise_without_halves` (what SURE and the wedge ratio
  use), and the even/odd difference of `noise_from_halves` (scaled to the full
  tomogram);
- error of the restoration of the central crop (`restore_array` with the full
  tomogram's normalisation, as the calibration runs it) against the twin: exact, SURE
  (`sure_shell_error`) and the Wiener error P N / (P + N) used before it.

The twin is the data's signal (CTF, wedge and reconstruction included), which is what a
restoration of the measured region can reach.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch


def twin(sim: Path, seed: int, structures: Path) -> Path:
    """The noise-free simulation of `sim` (same seed and structures)."""
    out = sim.parent / f"{sim.name}_clean"
    if not (out / "tomo.mrc").exists():
        cmd = [sys.executable, "-m", "cryowae", "simulate", str(out), "--size", "128",
               "--seed", str(seed), "--voxel-size", "8", "--no-noise", "--overwrite"]
        from cryowae.data.structures import fetch_example_structures

        # in bench_families' order (the species order shapes the scene)
        for p in fetch_example_structures(structures):
            cmd += ["--pdb", str(p)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def shell_table(root: Path, seed: int, every: int) -> dict:
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume
    from cryowae.io.stats import volume_stats
    from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
    from cryowae.models.checkpoint import load_restorer
    from cryowae.physics.crop import central_box, crop_of
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.consistency import CHECK_EDGE, noise_of_data
    from cryowae.sampling.recalibrate import shell_error_estimate
    from cryowae.sampling.sure import sure_shell_error
    from cryowae.training.noise import measured_shell_power, noise_without_halves

    sim = root / f"sim_seed{seed}"
    clean_dir = twin(sim, seed, root / "structures")

    def vol(d: Path, name: str) -> np.ndarray:
        with read_volume(d / name) as v:
            return np.array(v.numpy(), dtype=np.float32)

    data, clean = vol(sim, "tomo.mrc"), vol(clean_dir, "tomo.mrc")
    even, odd = vol(sim, "tomo_even.mrc"), vol(sim, "tomo_odd.mrc")
    geo = TiltGeometry.from_file(sim / "tilts.tlt")
    crop = central_box(data.shape, CHECK_EDGE, even=True)
    x, s = crop_of(data, crop).numpy(), crop_of(clean, crop).numpy()
    exact, _ = measured_shell_power(torch.from_numpy(x - s), geo)
    ramp = noise_without_halves(torch.from_numpy(x), geo).power
    halves = noise_of_data(torch.from_numpy(x), geo, crop_of(even, crop),
                           crop_of(odd, crop)).power
    restorer = load_restorer(root / f"run_seed{seed}_default" / "train" / "model.pt", "cpu")
    # the centre's function, as sample_file's (a new float32 array)
    restore = partial(restore_array, restorer, tile=64, overlap=21, batch_size=4,
                      norm=volume_stats(data))

    sure = sure_shell_error(restore, x, geo)
    wiener, _ = shell_error_estimate(x, geo)
    grid = SpectralGrid.of(x.shape, geo)
    count = grid.shell_sums(torch.ones(grid.measured.shape), grid.measured)
    diff = torch.fft.rfftn(torch.from_numpy(restore(x) - s), dim=(-3, -2, -1), norm="ortho")
    with np.errstate(invalid="ignore", divide="ignore"):
        true_err = grid.shell_sums(diff.abs().square(), grid.measured) / count
    freq = shell_frequencies(x.shape)
    print(f"\nseed {seed}: central crop {x.shape}, measured region, per coefficient")
    print("| cycles/voxel | noise exact | ramp fit | even/odd | error exact | SURE | Wiener |")
    print("|---|---|---|---|---|---|---|")
    for i in range(1, len(freq), every):
        if count[i] == 0:
            continue
        print(f"| {freq[i]:.3f} | {exact[i]:.4f} | {ramp[i]:.4f} | {halves[i]:.4f} | "
              f"{true_err[i]:.4f} | {sure.error[i]:.4f} | {wiener[i]:.4f} |")
    band = (freq > 0.03) & (freq < 0.3) & (count > 0)
    tot = {k: float(np.nansum((v * count)[band])) for k, v in
           (("exact", true_err), ("sure", sure.error), ("wiener", wiener))}
    print(f"summed over 0.03-0.3 cycles/voxel: error exact {tot['exact']:.1f}, SURE "
          f"{tot['sure']:.1f} ({tot['sure'] / tot['exact']:.2f}x), Wiener "
          f"{tot['wiener']:.1f} ({tot['wiener'] / tot['exact']:.2f}x)")
    return tot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/bfam10"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12])
    ap.add_argument("--every", type=int, default=4, help="print every n-th shell")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for seed in a.seeds:
        shell_table(a.root, seed, a.every)
    print("\ncommand: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
