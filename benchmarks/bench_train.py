"""Training benchmark: each divergence for the same CPU budget on simulated tomograms.

    python benchmarks/bench_train.py --seeds 0 1 2 --minutes 15 \
        --divergences mmd sinkhorn sliced adversarial none --out bench_train_out

For each seed: `cryowae simulate` (128 -> 80x128x128 at 8 A, real protein structures from
the mdanalysistests sdist when they can be fetched, CTF, 120 e/A^2, -60..60 step 3, even/
odd halves); for each divergence: train on the halves for the budget, restore, and
report overall / measured-region / wedge-region correlation to ground truth, FSC 0.143
resolution, the final MMD between the aggregated codes and the N(0, I) prior, and the
training throughput. Floors: the raw tomogram and the best Gaussian low-pass (sigma
chosen with the ground truth: an oracle, so a generous floor). Prints a Markdown table,
writes results.json, and prints the command that ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch


def simulate(out: Path, seed: int, size: int, pdbs: list[Path]) -> Path:
    sim = out / f"sim_seed{seed}"
    if not (sim / "gt.mrc").exists():
        cmd = [sys.executable, "-m", "cryowae", "simulate", str(sim), "--size", str(size),
               "--seed", str(seed), "--voxel-size", "8", "--overwrite"]
        for p in pdbs:
            cmd += ["--pdb", str(p)]
        t = time.time()
        subprocess.run(cmd, check=True)
        print(f"simulated seed {seed} in {time.time() - t:.0f} s", flush=True)
    return sim


def lowpass_floor(tomo: np.ndarray, gt: np.ndarray, voxel: float) -> dict:
    from cryowae.metrics.correlation import pearson
    from cryowae.metrics.report import evaluate_volumes

    t = torch.from_numpy(tomo)[None, None]
    best = None
    for sigma in (0.75, 1.0, 1.5, 2.0, 3.0):
        r = int(3 * sigma) + 1
        x = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-x**2 / (2 * sigma**2))
        k = k / k.sum()
        v = t
        for dim in range(3):
            shape = [1, 1, 1, 1, 1]
            shape[2 + dim] = -1
            v = torch.nn.functional.conv3d(
                torch.nn.functional.pad(v, [r if 2 - dim == i // 2 else 0 for i in range(6)],
                                        mode="replicate"), k.view(shape))
        arr = v[0, 0].numpy()
        c = pearson(arr, gt)
        if best is None or c > best[0]:
            best = (c, sigma, arr)
    assert best is not None
    m = evaluate_volumes(best[2], gt, voxel)
    m["sigma_vox"] = best[1]
    return m


def code_stats(codes: torch.Tensor) -> dict:
    """Norm of the mean and mean per-dimension standard deviation of the fresh codes
    stored in model.pt (the N(0, I) prior: about 0 and 1)."""
    if codes.numel() == 0:
        return {}
    return {"code_mean_norm": float(codes.mean(0).norm()),
            "code_std": float(codes.std(0).mean())}


def read_result(run: Path) -> dict:
    """The result.json of a finished run (code statistics added for older files)."""
    from cryowae.models.checkpoint import load_restorer

    row = json.loads((run / "result.json").read_text())
    if "code_std" not in row and (run / "model.pt").exists():
        row |= code_stats(load_restorer(run / "model.pt").codes)
    return row


def run_one(out: Path, seed: int, div: str, config: str, minutes: float, tile: int) -> dict:
    """Train one divergence on one seed's halves, restore both halves, evaluate.

    The result is written to ``run_seed{seed}_{div}/result.json``; an existing result is
    reused, so an interrupted benchmark resumes with the runs it had not finished.
    """
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume
    from cryowae.metrics.report import evaluate_volumes
    from cryowae.models.checkpoint import load_restorer
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train

    run = out / f"run_seed{seed}_{div}"
    done = run / "result.json"
    if done.exists():
        return read_result(run)
    if run.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(run)
    sim = out / f"sim_seed{seed}"
    gt_vol = read_volume(sim / "gt.mrc")
    gt = gt_vol.numpy()
    even = read_volume(sim / "tomo_even.mrc").numpy()
    odd = read_volume(sim / "tomo_odd.mrc").numpy()
    cfg = load_config(config).replace(divergence=div, minutes=minutes, steps=10**9,
                                      seed=seed)
    sources = load_sources([sim / "tomo.mrc"], [sim / "tomo_even.mrc"],
                           [sim / "tomo_odd.mrc"], min_size=cfg.patch_size)
    t0 = time.time()
    res = train(sources, cfg, run)
    t_train = time.time() - t0
    model = load_restorer(run / "model.pt")
    t0 = time.time()
    rest = 0.5 * (restore_array(model, even, tile=tile, overlap=tile // 3)
                  + restore_array(model, odd, tile=tile, overlap=tile // 3))
    t_restore = time.time() - t0
    m = evaluate_volumes(rest, gt, gt_vol.voxel_size)
    row = {"seed": seed, "method": f"cryowae {div}", "steps": res.steps,
           "train_s": t_train, "restore_s": t_restore,
           "subtomos_per_s": res.steps * cfg.batch_size / max(t_train, 1e-9),
           "mmd_to_prior": res.final.get("mmd_to_prior"),
           "threads": torch.get_num_threads()} | code_stats(model.codes) | m
    done.write_text(json.dumps(row, default=float))
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--divergences", nargs="+",
                    default=["mmd", "sinkhorn", "sliced", "adversarial", "none"])
    ap.add_argument("--config", default="cpu-small")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs at once, each with cores/parallel torch threads")
    ap.add_argument("--no-pdb", action="store_true", help="procedural particles only")
    ap.add_argument("--out", type=Path, default=Path("bench_train_out"))
    ap.add_argument("--single", nargs=2, metavar=("SEED", "DIVERGENCE"),
                    help=argparse.SUPPRESS)  # one run, in a child process
    a = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.single:
        row = run_one(a.out, int(a.single[0]), a.single[1], a.config, a.minutes, a.tile)
        print(json.dumps({k: v for k, v in row.items() if k != "fsc"}, default=float),
              flush=True)
        return

    from cryowae.io import read_volume
    from cryowae.metrics.report import evaluate_volumes

    pdbs: list[Path] = []
    if not a.no_pdb:
        try:
            from cryowae.data.structures import fetch_example_structures

            pdbs = fetch_example_structures(a.out / "structures")
        except Exception as exc:  # offline: fall back to procedural particles, say so
            print(f"no PDB structures ({exc}); procedural particles only", flush=True)
    rows: list[dict] = []
    for seed in a.seeds:
        sim = simulate(a.out, seed, a.size, pdbs)
        gt = read_volume(sim / "gt.mrc").numpy()
        tomo = read_volume(sim / "tomo.mrc")
        voxel = tomo.voxel_size
        raw = tomo.numpy()
        rows.append({"seed": seed, "method": "raw tomogram"} | evaluate_volumes(raw, gt, voxel))
        rows.append({"seed": seed, "method": "best Gaussian low-pass (oracle)"}
                    | lowpass_floor(raw, gt, voxel))
    jobs = [(seed, div) for seed in a.seeds for div in a.divergences]
    threads = max(1, (os.cpu_count() or 1) // a.parallel)

    def launch(job: tuple[int, str]) -> None:
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
                            "CRYOWAE_NO_TENSORBOARD": "1"}
        cmd = [sys.executable, __file__, "--single", str(job[0]), job[1], "--out", str(a.out),
               "--minutes", str(a.minutes), "--config", a.config, "--tile", str(a.tile)]
        subprocess.run(cmd, check=True, env=env)

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        list(pool.map(launch, jobs))
    for seed, div in jobs:
        rows.append(read_result(a.out / f"run_seed{seed}_{div}"))
    (a.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    keys = ["pearson", "cc_measured", "cc_wedge", "fsc_0143_A", "mmd_to_prior",
            "code_mean_norm", "code_std", "steps",
            "subtomos_per_s", "restore_s"]
    print("\n| seed | method | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for r in sorted(rows, key=lambda r: r["seed"]):
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        print(f"| {r['seed']} | {r['method']} | " + " | ".join(cells) + " |")
    print(f"\ncommand: {command}")
    print(f"runs at once: {a.parallel}, torch threads per run: {threads}, "
          f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
