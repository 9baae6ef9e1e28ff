"""Per resolution shell, how close are the spread calibration's error estimates to the
restoration's true error in the measured region? (issue 11)

For each seed of a bench_families run (``sim_seed{S}``, ``run_seed{S}_default`` with
``restored.mrc``), on the central crop (`central_box`) and inside the measured region:
the true error |r - t|^2 of the restoration r against the truth the data can show (t:
ground truth filtered by |CTF| on the data's scale, as `cryowae evaluate`), and the
ratio to it of the Wiener error P N / (P + N) with the noise power N from the even/odd
halves (``wiener_halves``) or estimated from the tomogram alone (``wiener_est``), and of
an estimate from the restoration alone (``restoration``: W = sqrt(|r|^2 / D), error
W (1 - W) D, D the data's power). Prints every fourth shell.

    OMP_NUM_THREADS=1 python benchmarks/bench_error_estimates.py \
        --case /tmp/bfam 3 --case /tmp/bfam 4 --case /tmp/bfam7 7
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch


def ratios(root: Path, seed: int) -> dict[str, np.ndarray]:
    """Per-shell ratios estimate / true error of one seed, and the shell frequencies."""
    from bench_recalibration import load_case

    from cryowae.io import read_volume
    from cryowae.metrics.calibration import shell_frequencies
    from cryowae.physics.crop import central_box
    from cryowae.sampling.consistency import CHECK_EDGE
    from cryowae.sampling.recalibrate import wiener_error
    from cryowae.training.noise import (
        measured_shell_power,
        noise_from_halves,
        noise_without_halves,
    )

    c = load_case(root, seed, "family_nohalves")
    with read_volume(c["restored"]) as v:
        r = torch.from_numpy(np.array(v.numpy(), dtype=np.float32))
    crop, geo = central_box(tuple(r.shape), CHECK_EDGE, even=True), c["geometry"]
    d, t, rr, e, o = (x[crop] for x in (c["data"], c["truth"], r, c["even"], c["odd"]))
    power = {k: np.nan_to_num(measured_shell_power(v, geo)[0])
             for k, v in (("data", d), ("restored", rr), ("error", rr - t))}
    n_est = noise_without_halves(d, geo).power
    n_halves = noise_from_halves(e, o, geo).full.power
    w = np.sqrt(np.clip(power["restored"] / power["data"], 0.0, 1.0))
    est = {"wiener_halves": wiener_error(power["data"] - n_halves, n_halves),
           "wiener_est": wiener_error(power["data"] - n_est, n_est),
           "restoration": w * (1 - w) * power["data"]}
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {k: v / power["error"] for k, v in est.items()}
    out["frequency"] = shell_frequencies(tuple(d.shape))[:len(power["error"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", nargs=2, action="append", metavar=("ROOT", "SEED"),
                    required=True)
    ap.add_argument("--every", type=int, default=4, help="print every N-th shell")
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    for root, seed in a.case:
        r = ratios(Path(root), int(seed))
        sel = slice(2, None, a.every)
        print(f"seed {seed}: shells (cycles/voxel) "
              + " ".join(f"{f:.3f}" for f in r["frequency"][sel]))
        for k in ("wiener_halves", "wiener_est", "restoration"):
            print(f"  {k} / true error: " + " ".join(f"{v:.2f}" for v in r[k][sel]))
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
