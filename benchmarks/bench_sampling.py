"""Is the uncertainty of a posterior family real? Checks on simulated data with ground truth.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py --work /tmp/bench_sampling

1. Data: `cryowae simulate` when the simulator is installed (its tomogram, even/odd
   halves and ground truth), otherwise a built-in phantom: blobs and a membrane shell,
   seen through a -60..60 degree wedge, halves with independent noise, full = mean of
   the halves.
2. A restorer trained briefly with the library API (`cryowae.training.loop.train`,
   noise2noise on the halves). Reused from --work when already there.
3. Families with several samplers / epsilons / consistency modes, and per family:
   (a) mean Fourier energy of sample-to-sample differences per Fourier voxel, missing
       wedge vs measured region (ratio),
   (b) calibration: fraction of ground-truth voxels inside each voxel's central 50 % and
       90 % sample interval (`cryowae.metrics.calibration.interval_coverage`); also with
       the even/odd noise added to the spread (see below), and the Fourier-space wedge
       calibration: family variance in the wedge / squared error of the mean there,
   (c) Pearson correlation to the ground truth of the family mean vs the single
       restoration (`restore_array`), the latter with and without hard consistency;
   plus the correlation between the per-voxel std and the per-voxel error of the mean.

Noise-aware intervals: with hard consistency every sample carries the data's own noise in
the measured region, so the family cannot express it and its intervals are too narrow
wherever noise dominates. The noise of the full tomogram is measured without ground truth
by the even/odd halves (`cryowae.sampling.noise_std_from_halves`: for full = (e + o) / 2,
Var(noise) = E[(e - o)^2] / 4, averaged over 5^3 voxels; `sample_file` writes it as
noise_std.mrc). The "+noise" columns use Gaussian intervals mean +- z sqrt(var_family +
var_noise). This uses no ground truth; it is a principled correction, not a fitted one.

The ground truth is put on the tomogram's intensity scale by the affine map that best
fits the wedge-filtered ground truth to the tomogram (least squares; identity for the
built-in phantom).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryowae.io import read_volume, write_mrc
from cryowae.physics.wedge import apply_wedge

TILT = (-60.0, 60.0)


# ----------------------------------------------------------------------------- data
def phantom(shape=(32, 64, 64), seed=0, noise=1.0) -> dict[str, np.ndarray]:
    """Ground truth (blobs + a membrane shell, unit std), halves and full tomogram."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    gt = np.zeros(shape, dtype=np.float32)
    for _ in range(40):  # protein-like ellipsoids
        c = [rng.uniform(3, s - 3) for s in shape]
        r = rng.uniform(1.5, 4.5, size=3)
        d = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2
        gt += rng.uniform(0.5, 1.5) * (d <= 1)
    # a vesicle-like membrane: a spherical shell, partly horizontal (hit by the wedge)
    c = (shape[0] / 2, shape[1] * 0.4, shape[2] * 0.55)
    rad = np.sqrt((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2)
    gt += 1.5 * (np.abs(rad - min(shape) * 0.38) <= 1.0)
    g = torch.from_numpy(gt)[None, None]
    k = torch.exp(-0.5 * (torch.arange(-2, 3, dtype=torch.float32) / 0.8) ** 2)
    k = k / k.sum()
    for dim in range(3):  # separable Gaussian blur, sigma 0.8 voxel
        shp = [1, 1, 1, 1, 1]
        shp[2 + dim] = 5
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = 2
        g = torch.nn.functional.conv3d(torch.nn.functional.pad(g, pad, mode="replicate"),
                                       k.view(shp))
    gt = g[0, 0].numpy()
    gt = (gt - gt.mean()) / gt.std()
    halves = []
    for _ in range(2):
        n = rng.normal(scale=noise, size=shape).astype(np.float32)
        halves.append(apply_wedge(torch.from_numpy(gt + n), *TILT).numpy())
    full = (halves[0] + halves[1]) / 2
    return {"gt": gt.astype(np.float32), "even": halves[0], "odd": halves[1],
            "tomo": full.astype(np.float32)}


def simulated(work: Path, size: int) -> dict[str, Path] | None:
    """Files of `cryowae simulate`, or None when the simulator is not installed."""
    if importlib.util.find_spec("cryowae.cli.simulate") is None:
        return None
    out = work / f"sim{size}"
    if not out.exists():
        cmd = [sys.executable, "-m", "cryowae", "simulate", str(out), "--size", str(size),
               "--seed", "0"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"cryowae simulate failed ({proc.stderr.strip()[:200]}); using the phantom")
            return None
    files = [p for p in out.rglob("*") if p.suffix in (".mrc", ".zarr")]

    def pick(*keys: str, avoid: tuple[str, ...] = ()) -> Path | None:
        for p in sorted(files):
            n = p.name.lower()
            if any(k in n for k in keys) and not any(a in n for a in avoid):
                return p
        return None

    found = {"gt": pick("gt", "truth", "ground"), "even": pick("even"), "odd": pick("odd"),
             "tomo": pick("tomo", "full", avoid=("even", "odd", "gt", "truth"))}
    if any(v is None for v in found.values()):
        print(f"could not identify the simulator's files in {out}; using the phantom")
        return None
    return found  # type: ignore[return-value]


def gt_on_data_scale(gt: np.ndarray, tomo: np.ndarray) -> np.ndarray:
    """a * gt + b with (a, b) fitting the wedge-filtered gt to the tomogram."""
    w = apply_wedge(torch.from_numpy(gt), *TILT).numpy().astype(np.float64)
    t = tomo.astype(np.float64)
    wc, tc = w - w.mean(), t - t.mean()
    a = float((wc * tc).sum() / (wc * wc).sum())
    b = float(t.mean() - a * gt.mean())
    return (a * gt + b).astype(np.float32)


# ---------------------------------------------------------------------------- metrics
def gaussian_coverage(mean: np.ndarray, var: np.ndarray, gt: np.ndarray,
                      levels=(0.5, 0.9)) -> dict[float, float]:
    from scipy.stats import norm

    err = np.abs(gt - mean)
    sd = np.sqrt(np.maximum(var, 1e-20))
    return {lv: float((err <= norm.ppf(0.5 + lv / 2) * sd).mean()) for lv in levels}


def coverage(samples: np.ndarray, gt: np.ndarray) -> tuple[dict[float, float], str]:
    try:
        from cryowae.metrics.calibration import interval_coverage

        return interval_coverage(samples, gt, (0.5, 0.9)), "cryowae.metrics"
    except ImportError:
        lo50, hi50, lo90, hi90 = np.quantile(samples, [0.25, 0.75, 0.05, 0.95], axis=0)
        return ({0.5: float(((gt >= lo50) & (gt <= hi50)).mean()),
                 0.9: float(((gt >= lo90) & (gt <= hi90)).mean())}, "numpy quantiles")


def wedge_spread_vs_error(samples: np.ndarray, gt: np.ndarray) -> float:
    """Family variance in the missing wedge / squared error of the mean there (Fourier).

    About 1 + 1/S for a calibrated family; < 1: the family is too narrow in the wedge."""
    from cryowae.sampling.consistency import fourier_region_energy

    mean = samples.mean(0)
    var_w = np.mean([fourier_region_energy(s - mean, *TILT)[0] for s in samples])
    err_w = fourier_region_energy(mean - gt, *TILT)[0]
    return float(var_w * len(samples) / max(len(samples) - 1, 1) / err_w)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_sampling"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tile", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--noise", type=float, default=1.0, help="phantom: noise std per half")
    ap.add_argument("--epsilons", default="0.05,0.2,0.5,1.0")
    ap.add_argument("--ensemble", type=int, default=0,
                    help="also train this many extra models (seeds 1..) for --sampler ensemble")
    ap.add_argument("--data", choices=("auto", "phantom"), default="auto",
                    help="auto: `cryowae simulate` when installed, else the phantom")
    ap.add_argument("--train-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                                ".venv/bin/python", *sys.argv]))

    from cryowae.models.checkpoint import load_restorer
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train

    files = simulated(work, args.size) if args.data != "phantom" else None
    source = "cryowae simulate"
    if files is None:
        source = "built-in phantom"
        vols = phantom((args.size // 2, args.size, args.size), seed=0, noise=args.noise)
        files = {}
        for k, v in vols.items():
            files[k] = work / f"{k}.mrc"
            if not files[k].exists():
                write_mrc(files[k], v, 10.0)
    data = {k: np.array(read_volume(p).numpy()) for k, p in files.items()}
    print(f"data: {source}, shape {data['tomo'].shape}, files in {work}")

    def trained(seed: int) -> Path:
        tag = "sim" if source == "cryowae simulate" else "phantom"
        run = work / f"run_{tag}_steps{args.steps}_seed{seed}"
        if not (run / "model.pt").exists():
            cfg = TrainConfig.from_dict(dict(
                patch_size=32, channels=8, depth=3, latent_dim=16, batch_size=4,
                steps=args.steps, lr=2e-3, bank_size=512, tilt_min=TILT[0],
                tilt_max=TILT[1], seed=seed, check_prior_preference=False, device="cpu",
                checkpoint_every=max(25, args.steps // 4)))
            t0 = time.perf_counter()
            res = train(load_sources([files["tomo"]], [files["even"]], [files["odd"]]), cfg,
                        run)
            print(f"trained seed {seed}: {res.steps} steps in {time.perf_counter() - t0:.0f} s"
                  f", final {json.dumps({k: round(v, 4) for k, v in res.final.items()})}")
        return run / "model.pt"

    models = [trained(0)] + [trained(s) for s in range(1, args.ensemble + 1)]
    if args.train_only:
        return
    restorer = load_restorer(models[0])
    from cryowae.inference.restore import restore_array
    from cryowae.sampling import prepare_consistency, sample_array

    tomo, gt = data["tomo"], gt_on_data_scale(data["gt"], data["tomo"])
    kw = {"tile": args.tile, "overlap": args.overlap, "batch_size": 4}
    single = restore_array(restorer, tomo, **kw)
    mu, sd = float(tomo.mean()), float(tomo.std())
    hard = prepare_consistency((tomo - mu) / sd, "hard", *TILT)
    single_hard = hard.apply((single - mu) / sd) * sd + mu
    from cryowae.sampling import noise_std_from_halves

    var_noise = noise_std_from_halves(tomo, data["even"], data["odd"]).astype(np.float64) ** 2
    print(f"noise std (even/odd) {math.sqrt(var_noise.mean()):.3f}, gt std {gt.std():.3f}; "
          f"true noise std {np.std(tomo - apply_wedge(torch.from_numpy(gt), *TILT).numpy()):.3f}")
    print(f"pearson to gt: tomogram {pearson(tomo, gt):.4f}, single restoration "
          f"{pearson(single, gt):.4f}, single + hard consistency {pearson(single_hard, gt):.4f}")
    codes = restorer.codes
    print(f"training codes: {tuple(codes.shape)}, rms per coordinate "
          f"{float(codes.std(0).pow(2).mean().sqrt()):.3f} (prior sigma "
          f"{restorer.train_config.get('prior_sigma')})")

    runs: list[tuple[str, dict]] = []
    for e in [float(v) for v in args.epsilons.split(",")]:
        runs.append((f"ot eps={e:g}", {"sampler": "ot", "epsilon": e}))
    runs += [("ot eps=0.2 prior=gaussian", {"sampler": "ot", "epsilon": 0.2,
                                            "prior": "gaussian"}),
             ("ot eps=0.2 prior=codes", {"sampler": "ot", "epsilon": 0.2, "prior": "codes"}),
             ("ot eps=0.2 soft", {"sampler": "ot", "epsilon": 0.2, "consistency": "soft"}),
             ("ot eps=0.2 none", {"sampler": "ot", "epsilon": 0.2, "consistency": "none"}),
             ("gaussian eps=0.5", {"sampler": "gaussian", "epsilon": 0.5}),
             ("rotations", {"sampler": "rotations"})]
    if len(models) > 1:
        runs.append(("ensemble", {"sampler": "ensemble"}))
    header = (f"{'family':28s} {'eff':>6s} {'std/σ':>7s} {'wedge/meas':>10s} {'cov50':>6s} "
              f"{'cov90':>6s} {'+n50':>6s} {'+n90':>6s} {'Fwedge':>7s} {'r(std,err)':>10s} "
              f"{'r_mean':>7s} {'r_s0':>7s} {'sec':>5s}")
    print(header)
    results = {}
    for name, opts in runs:
        n = min(args.n, 24) if opts["sampler"] == "rotations" else args.n
        t0 = time.perf_counter()
        if opts["sampler"] == "ensemble":
            r = [load_restorer(m) for m in models]
        else:
            r = restorer
        res = sample_array(r, tomo, n_samples=n, even=data["even"], odd=data["odd"], seed=0,
                           **kw, **opts)
        sec = time.perf_counter() - t0
        cov, how = coverage(res.samples, gt)
        var_f = res.std.astype(np.float64) ** 2
        cov_n = gaussian_coverage(res.mean, var_f + var_noise, gt)
        err = np.abs(res.mean - gt)
        row = {
            "eff_codes": res.info.get("ot", {}).get("effective_codes_per_tile", {}).get(
                "mean", float("nan")),
            "std_rel": res.info["figures"]["voxel_std_relative"],
            "ratio": res.info["figures"]["diff_energy_ratio_wedge_over_measured"],
            "cov50": cov[0.5], "cov90": cov[0.9], "cov50_noise": cov_n[0.5],
            "cov90_noise": cov_n[0.9], "wedge_spread_over_error":
                wedge_spread_vs_error(res.samples, gt),
            "r_std_err": pearson(res.std, err), "r_mean": pearson(res.mean, gt),
            "r_sample0": pearson(res.samples[0], gt), "seconds": sec,
            "consistency": res.info["consistency"]["mode"], "coverage_by": how,
        }
        results[name] = row
        print(f"{name:28s} {row['eff_codes']:6.1f} {row['std_rel']:7.4f} {row['ratio']:10.3g} "
              f"{row['cov50']:6.3f} {row['cov90']:6.3f} {row['cov50_noise']:6.3f} "
              f"{row['cov90_noise']:6.3f} {row['wedge_spread_over_error']:7.3f} "
              f"{row['r_std_err']:10.3f} {row['r_mean']:7.4f} {row['r_sample0']:7.4f} "
              f"{sec:5.0f}", flush=True)
    print("columns: eff = effective codes per tile (exp row entropy); std/σ = mean voxel std "
          "/ tomogram std; wedge/meas = Fourier energy of sample differences per voxel, "
          "wedge over measured; cov50/90 = ground truth inside the samples' central 50/90 % "
          "interval; +n50/90 = Gaussian intervals with the even/odd noise variance added; "
          "Fwedge = family variance / squared error of the mean in the wedge (Fourier; ~1 "
          "when calibrated); r(std,err) = correlation of voxel std and |mean - gt|; r_mean, "
          "r_s0 = Pearson to gt of the mean and of one sample")
    (work / "bench_sampling.json").write_text(json.dumps(
        {"source": source, "single": pearson(single, gt),
         "single_hard": pearson(single_hard, gt), "tomogram": pearson(tomo, gt),
         "families": results}, indent=2, default=float))
    print(f"figures: {work / 'bench_sampling.json'}")


if __name__ == "__main__":
    main()
