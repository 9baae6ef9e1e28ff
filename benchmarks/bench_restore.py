"""Tiled restoration: throughput, peak memory and seams per tile setting; halves vs one pass.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_restore.py --work /tmp/bench_restore

1. Speed (``--part speed``): a smooth synthetic tomogram of ``--size`` (Z x Y x X) is
   written as MRC and restored by `cryowae.inference.restore.restore_file` (memory-mapped
   input, MRC output written slab by slab) with a restorer of realistic size
   (RestorerConfig(channels=12, depth=3, latent_dim=32), untrained, but with a random
   output head so that it is not the identity), once per tile/overlap setting, each in
   a fresh process. Reported per setting: output voxels/s, network (tile) voxels/s, peak
   RSS of the process and its growth over the loaded model, and a seam measure: per
   axis, the mean |second difference| of the output on the planes at tile edges divided
   by the same on planes away from edges (1 = no seam; the worst axis is shown). A
   reference without blending (tiles butted, overlap 0, flat window) shows what a seam
   reads as. The time for 256x512x512 is extrapolated from the tile-voxel rate.
   The spec's 256x512x512 runs with ``--size 256x512x512``; at about 0.08 M tile
   voxels/s on 2 shared CPU cores that is ~45 min per setting, hence a smaller default.
2. Quality (``--part quality``): `cryowae simulate` tomograms (with even/odd halves and
   ground truth); a small restorer trained briefly on the first (noise2noise on the
   halves, `cryowae.training.loop.train`); then each tomogram restored (a) in one pass on
   the full tomogram and (b) half by half, averaged (`restore_halves`), and scored
   against the ground truth with `cryowae.metrics.report.evaluate_volumes`. The numbers
   behind the `cryowae restore --halves` default are in
   `cryowae.inference.restore.DEFAULT_HALVES_MODE` (``--train-steps 600``, and the
   default 3-minute budget). Training time is wall clock: on a shared machine the same
   budget gives very different step counts, hence ``--train-steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = ((64, 16), (96, 32), (128, 32))
BIG = (256, 512, 512)


def parse_size(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or min(parts) < 8:
        raise argparse.ArgumentTypeError(f"--size wants ZxYxX, got {text!r}")
    return tuple(parts)  # type: ignore[return-value]


def parse_settings(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(a), int(b)) for a, b in (p.split(":") for p in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--settings wants tile:overlap,..., got {text!r}") from None
    return pairs


# ----------------------------------------------------------------------------- data
def smooth_volume(path: Path, shape: tuple[int, int, int], voxel_size: float = 10.0) -> None:
    """A smooth tomogram-like volume (low-frequency waves + soft blobs), slab by slab."""
    from cryowae.io import open_mrc_writer

    rng = np.random.default_rng(0)
    nz, ny, nx = shape
    blobs = [(rng.uniform(0, nz), rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(4, 12),
              rng.uniform(-1, 1)) for _ in range(max(8, nz * ny * nx // 200_000))]
    y, x = np.meshgrid(np.arange(ny, dtype=np.float32), np.arange(nx, dtype=np.float32),
                       indexing="ij")
    with open_mrc_writer(path, shape, voxel_size) as out:
        for z in range(nz):
            sl = (np.sin(2 * np.pi * (z / 61 + y / 83 + x / 97)) +
                  0.5 * np.cos(2 * np.pi * (y / 47 - z / 71)) * np.sin(2 * np.pi * x / 59))
            for bz, by, bx, r, a in blobs:
                dz = z - bz
                if abs(dz) < 3 * r:
                    sl += a * np.exp(-((y - by) ** 2 + (x - bx) ** 2 + dz ** 2) / (2 * r * r))
            out[z] = sl.astype(np.float32)


def bench_model(path: Path) -> Path:
    """An untrained restorer of realistic size whose output head is random (not zero)."""
    from cryowae.models.checkpoint import save_restorer
    from cryowae.models.restorer import RestorerConfig, WAERestorer
    from cryowae.training.config import TrainConfig

    if path.exists():
        return path
    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=64, restorer=RestorerConfig(12, 3, 32))
    model = WAERestorer(cfg.restorer)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    save_restorer(path, model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(64, cfg.restorer.latent_dim))
    return path


# ----------------------------------------------------------------------------- seams
def plane_curvature(data, chunk: int = 16) -> list[np.ndarray]:
    """Per axis a, the mean |second difference along a| on each plane 1..n-2 (slab-wise)."""
    nz, ny, nx = data.shape
    sums = [np.zeros(nz), np.zeros(ny), np.zeros(nx)]
    for z0 in range(0, nz, chunk):
        z1 = min(nz, z0 + chunk)
        a = np.asarray(data[max(0, z0 - 1):min(nz, z1 + 1)], dtype=np.float64)
        off = z0 - max(0, z0 - 1)
        core = a[off:off + (z1 - z0)]
        d1 = np.abs(np.diff(core, 2, axis=1)).sum(axis=(0, 2))
        d2 = np.abs(np.diff(core, 2, axis=2)).sum(axis=(0, 1))
        sums[1][1:-1] += d1
        sums[2][1:-1] += d2
        d0 = np.abs(np.diff(a, 2, axis=0)).sum(axis=(1, 2))  # centres max(0,z0-1)+1 ...
        for i, v in enumerate(d0):
            c = max(0, z0 - 1) + 1 + i
            if z0 <= c < z1:
                sums[0][c] += v
    areas = (ny * nx, nz * nx, nz * ny)
    return [s / n for s, n in zip(sums, areas, strict=True)]


def seam_ratio(data, plan) -> float:
    """Worst axis: mean curvature on planes at tile edges / on planes away from edges
    (nan when no axis has a tile edge)."""
    worst = float("nan")
    for ax, prof in enumerate(plane_curvature(data)):
        n = len(prof)
        edges = plan.edges(ax)
        if not edges:
            continue
        near = {c for e in edges for c in (e - 1, e)}
        at = [prof[c] for c in range(1, n - 1) if c in near]
        far = [prof[c] for c in range(3, n - 3) if all(abs(c - e) > 2 for e in edges)]
        if at and far:
            r = float(np.mean(at) / np.mean(far))
            worst = r if math.isnan(worst) else max(worst, r)
    return worst


# ----------------------------------------------------------------------------- speed
def child(args: argparse.Namespace) -> None:
    """One restoration in this (fresh) process; prints a JSON line."""
    from cryowae.inference.restore import restore_file

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    restore_file(args.model, args.input, args.output, tile=args.tile, overlap=args.overlap,
                 batch_size=args.batch_size, device="cpu", overwrite=True)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": peak}))


def tile_voxels(shape, tile: int, overlap: int, multiple: int = 8) -> int:
    from cryowae.tiling.plan import plan_tiles, round_up

    plan = plan_tiles(shape, round_up(tile, multiple), overlap, multiple)
    return plan.n_tiles * math.prod(plan.tile)


def run_speed(args: argparse.Namespace) -> None:
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume
    from cryowae.models.checkpoint import load_restorer
    from cryowae.tiling.plan import plan_tiles

    work = args.work
    shape = args.size
    model = bench_model(work / "bench_model.pt")
    src = work / f"smooth_{'x'.join(map(str, shape))}.mrc"
    if not src.exists():
        smooth_volume(src, shape)
    nvox = math.prod(shape)
    print(f"\n== speed: {'x'.join(map(str, shape))} float32 ({nvox * 4 / 1e6:.0f} MB), "
          f"RestorerConfig(channels=12, depth=3, latent_dim=32), cpu, "
          f"{torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"{'tile/overlap':>12} {'tiles':>6} {'seconds':>8} {'out Mvox/s':>10} "
          f"{'tile Mvox/s':>11} {'peak RSS MB':>11} {'growth MB':>9} {'seam':>6} "
          f"{'est. 256x512x512':>16}")
    for tile, overlap in args.settings:
        out = work / f"restored_{tile}_{overlap}.mrc"
        cmd = [sys.executable, __file__, "--child", "--model", str(model), "--input", str(src),
               "--output", str(out), "--tile", str(tile), "--overlap", str(overlap),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{tile}/{overlap}: failed: {proc.stderr.strip()[-400:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        plan = plan_tiles(shape, tile, overlap, 8)
        tv = tile_voxels(shape, tile, overlap)
        rate = tv / r["seconds"]
        est = tile_voxels(BIG, tile, overlap) / rate
        seam = seam_ratio(read_volume(out).data, plan)
        print(f"{tile:>7}/{overlap:<4} {plan.n_tiles:>6} {r['seconds']:>8.1f} "
              f"{nvox / r['seconds'] / 1e6:>10.3f} {rate / 1e6:>11.3f} "
              f"{r['peak_rss'] / 1e6:>11.0f} {(r['peak_rss'] - r['base_rss']) / 1e6:>9.0f} "
              f"{seam:>6.3f} {est / 60:>13.0f} min", flush=True)
        out.unlink()
    # what a seam reads as: tiles butted (overlap 0), no blending, on a crop
    crop_shape = (min(shape[0], 64), min(shape[1], 128), min(shape[2], 128))
    crop = np.asarray(read_volume(src).data[:crop_shape[0], :crop_shape[1], :crop_shape[2]])
    r = load_restorer(model)
    butted = restore_array(r, crop, tile=64, overlap=0, window="flat", batch_size=2)
    print(f"reference without blending (64/0, flat window, {'x'.join(map(str, crop_shape))} "
          f"crop): seam {seam_ratio(butted, plan_tiles(crop_shape, 64, 0, 8)):.3f}")


# ----------------------------------------------------------------------------- quality
def simulate(work: Path, seed: int, size: int) -> Path:
    out = work / f"sim{size}_seed{seed}"
    if not (out / "gt.mrc").exists():
        cmd = [sys.executable, "-m", "cryowae", "simulate", str(out), "--size", str(size),
               "--thickness", str(size // 2), "--voxel-size", "10", "--seed", str(seed),
               "--overwrite"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


def run_quality(args: argparse.Namespace) -> None:
    from cryowae.inference.restore import restore_array, restore_halves
    from cryowae.io import read_volume
    from cryowae.io.stats import volume_stats
    from cryowae.metrics.report import evaluate_volumes
    from cryowae.models.checkpoint import load_restorer
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train

    work = args.work
    seeds = [int(s) for s in args.quality_seeds.split(",")]
    sims = [simulate(work, s, args.quality_size) for s in seeds]
    meta = json.loads((sims[0] / "meta.json").read_text())
    tmin, tmax = meta["config"]["tilt_min"], meta["config"]["tilt_max"]
    if args.train_steps:
        run = work / f"run_q{args.quality_size}_{args.train_steps}steps"
        steps, minutes = args.train_steps, None
    else:
        run = work / f"run_q{args.quality_size}_{args.train_minutes:g}min"
        steps, minutes = 10**9, args.train_minutes
    if not (run / "model.pt").exists():
        cfg = TrainConfig.from_dict(dict(
            patch_size=32, channels=8, depth=2, latent_dim=16, batch_size=4, steps=steps,
            minutes=minutes, lr=2e-3, bank_size=512, tilt_min=tmin, tilt_max=tmax, seed=0,
            check_prior_preference=False, device="cpu", checkpoint_every=50))
        s = sims[0]
        res = train(load_sources([s / "tomo.mrc"], [s / "tomo_even.mrc"],
                                 [s / "tomo_odd.mrc"], min_size=32), cfg, run)
        print(f"\ntrained {res.steps} steps in {res.elapsed_s:.0f} s ({res.mode}) on "
              f"{sims[0].name}")
    restorer = load_restorer(run / "model.pt")
    kw = {"tile": 48, "overlap": 16, "batch_size": 4}
    print(f"\n== quality: halves vs one pass, {args.quality_size}x{args.quality_size}x"
          f"{args.quality_size // 2} simulations, model trained on seed {seeds[0]} "
          f"({run.name})")
    keys = ("pearson", "psnr_db", "cc_measured", "cc_wedge", "fsc_0143_A")
    print(f"{'tomogram':>10} {'method':>22} " + " ".join(f"{k:>11}" for k in keys))
    for seed, s in zip(seeds, sims, strict=True):
        tomo = read_volume(s / "tomo.mrc").numpy()
        even = read_volume(s / "tomo_even.mrc").numpy()
        odd = read_volume(s / "tomo_odd.mrc").numpy()
        gt = read_volume(s / "gt.mrc").numpy()
        full_norm = volume_stats(tomo)
        results = {
            "input (no restoration)": tomo,
            "one pass on full": restore_array(restorer, tomo, **kw),
            "halves, averaged": restore_halves(restorer, even, odd, out_norm=full_norm, **kw),
        }
        for name, vol in results.items():
            rep = evaluate_volumes(vol, gt, 10.0, TiltGeometry(tmin, tmax))
            label = f"seed {seed}" + (" (train)" if seed == seeds[0] else "")
            print(f"{label:>10} {name:>22} " + " ".join(f"{rep[k]:>11.4f}" for k in keys),
                  flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_restore"))
    ap.add_argument("--part", choices=("all", "speed", "quality"), default="all")
    ap.add_argument("--size", type=parse_size, default=(64, 192, 192),
                    help="speed: tomogram ZxYxX (default 64x192x192; the spec's 256x512x512 "
                    "takes ~2 h on 2 CPU cores)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--settings", type=parse_settings, default=SETTINGS,
                    help="speed: tile:overlap pairs, e.g. 128:32,96:32 (default "
                    + ",".join(f"{t}:{o}" for t, o in SETTINGS) + ")")
    ap.add_argument("--quality-size", type=int, default=96)
    ap.add_argument("--quality-seeds", default="1,2")
    ap.add_argument("--train-minutes", type=float, default=3.0,
                    help="quality: training budget (wall clock; the machine may be shared)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="quality: train this many steps instead of --train-minutes")
    # child mode (one restoration per process, for its peak RSS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--overlap", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.work.mkdir(parents=True, exist_ok=True)
    print("command:", " ".join([f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}",
                                ".venv/bin/python", *sys.argv]))
    t0 = time.perf_counter()
    if args.part in ("all", "speed"):
        run_speed(args)
    if args.part in ("all", "quality"):
        run_quality(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
