"""Posterior-family benchmark: are the families calibrated on data we did not tune on?

    python benchmarks/bench_families.py --seeds 3 4 5 --minutes 10 --parallel 2 \
        --variants default off --ablations m1 match --ablation-seeds 3 --out bench_fam

For each seed: `cryowae simulate` (80x128x128 at 8 A, the five example protein
structures, CTF on, 120 e/A^2, -60..60 step 3, even/odd halves). For each variant:
`cryowae train` on the halves for the same wall-clock budget on one core
(``default``: the posterior-family branch as shipped; ``off``: ``--no-family``, the
restorer as it was before the branch, for the single-restoration comparison; ``m1``:
``--samples-per-input 1``, the squared-error ablation; ``match`` / ``nomatch``: with /
without the posterior encoder's latent matching, ``--posterior-matching`` /
``--no-posterior-matching``). Then the single restoration (`restore_array`, one pass on
the full tomogram, as ``cryowae restore``) and, for variants with the branch, a family
of ``--n`` samples (`sample_file`, seed 0) without and with the even/odd halves, each
scored by `evaluate_family` against the ground truth the data can show (|CTF|-filtered,
see cryowae/sampling/evaluate.py): spread/skill in the measured and the wedge region,
90% coverage of the wedge component and of all voxels after a 30 A low-pass, family-mean
Pearson and wedge CC beside the single restoration's, and, per resolution shell where
the half-map FSC is above 0.5, whether the spread per Fourier coefficient is larger in
the wedge than in the measured region. Prints a Markdown table and the command, writes
results.json; finished runs are reused, so an interrupted benchmark resumes.
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
from typing import Any

import numpy as np
from bench_train import simulate  # the same simulated data as the training benchmark

VARIANT_FLAGS = {
    "default": [],
    "off": ["--no-family"],
    "m1": ["--samples-per-input", "1"],
    "nomatch": ["--no-posterior-matching"],
    "match": ["--posterior-matching"],
}


def half_map_fsc(sim: Path) -> tuple[np.ndarray, np.ndarray]:
    """FSC of the even and odd halves per shell inside the measured region, and the
    shells' frequencies (cycles per voxel, as `cryowae.metrics.calibration`)."""
    from cryowae.io import read_volume
    from cryowae.metrics.calibration import shell_frequencies
    from cryowae.physics.fourier import masked_fsc
    from cryowae.physics.geometry import TiltGeometry

    with read_volume(sim / "tomo_even.mrc") as e, read_volume(sim / "tomo_odd.mrc") as o:
        ev, od = np.array(e.numpy()), np.array(o.numpy())
    geo = TiltGeometry.from_file(sim / "tilts.tlt")
    mask = geo.wedge_mask(ev.shape, rfft=True) > 0.5
    import torch

    fsc = masked_fsc(torch.from_numpy(ev), torch.from_numpy(od), mask)
    fsc = np.asarray(fsc, dtype=np.float64)
    return fsc, shell_frequencies(ev.shape)[:len(fsc)]


def wedge_over_measured(report: dict[str, Any], good: np.ndarray) -> dict[str, Any]:
    """Per shell where the half-map FSC > 0.5: is the family's spread per Fourier
    coefficient larger in the wedge than in the measured region?"""
    shells = report["spread_skill"]["per_shell"]
    cols = report["spread_skill"].get("per_shell_columns")
    rows = []
    for j, row in enumerate(shells):
        if j >= len(good) or not good[j]:
            continue
        entry = dict(zip(cols, row, strict=True)) if cols else row
        sw, sm = entry.get("spread_wedge"), entry.get("spread_measured")
        if sw is None or sm is None or not (np.isfinite(sw) and np.isfinite(sm)):
            continue
        rows.append(sw / sm if sm > 0 else float("inf"))
    return {"shells": len(rows), "wedge_gt_measured": int(sum(r > 1 for r in rows)),
            "min_ratio": float(min(rows)) if rows else None}


def run_one(out: Path, seed: int, variant: str, minutes: float, n: int,
            tile: int, with_halves: bool = True,
            spread_calibration: str = "auto") -> dict[str, Any]:
    """Train one variant on one seed, restore, sample, evaluate (result.json)."""
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume, write_mrc
    from cryowae.metrics.report import evaluate_volumes
    from cryowae.models.checkpoint import load_restorer
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import evaluate_family
    from cryowae.sampling.files import sample_file
    from cryowae.sampling.settings import (
        CalibrationSettings,
        SamplerSettings,
        StorageSettings,
    )
    from cryowae.tiling.settings import TileSettings

    run = out / f"run_seed{seed}_{variant}"
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    sim = out / f"sim_seed{seed}"
    train_dir = run / "train"
    if not (train_dir / "model.pt").exists():
        if train_dir.exists():
            import shutil

            shutil.rmtree(train_dir)
        cmd = [sys.executable, "-m", "cryowae", "train", str(sim / "tomo.mrc"),
               "--even", str(sim / "tomo_even.mrc"), "--odd", str(sim / "tomo_odd.mrc"),
               "--out", str(train_dir), "--minutes", str(minutes), "--steps", "1000000",
               "--seed", str(seed), *VARIANT_FLAGS[variant]]
        t0 = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        (run / "train_s.txt").write_text(f"{time.time() - t0:.1f}")
    model = load_restorer(train_dir / "model.pt")
    extra = _model_extra(train_dir / "model.pt")
    with read_volume(sim / "tomo.mrc") as vol, read_volume(sim / "gt.mrc") as gvol:
        tomo, gt, voxel = vol.numpy(), gvol.numpy(), vol.voxel_size
    geo = TiltGeometry.from_file(sim / "tilts.tlt")
    t0 = time.time()
    rest = restore_array(model, tomo, tile=tile, overlap=tile // 3)
    t_restore = time.time() - t0
    write_mrc(run / "restored.mrc", rest, voxel)
    single = evaluate_volumes(rest, gt, voxel, geo)
    row: dict[str, Any] = {
        "seed": seed, "variant": variant, "steps": extra.get("step"),
        "restore_s": t_restore, "single_pearson": single["pearson"],
        "single_cc_wedge": single["cc_wedge"], "single_cc_measured": single["cc_measured"],
        "family_matching": extra.get("family_matching")}
    if model.stochastic is not None:
        fsc, _ = half_map_fsc(sim)
        good = fsc > 0.5
        modes: list[tuple[str, dict[str, Path]]] = [("nohalves", {})]
        if variant == "default" and with_halves:
            modes.append(("halves", {"even": sim / "tomo_even.mrc",
                                     "odd": sim / "tomo_odd.mrc"}))
        for label, halves in modes:
            fam = run / f"family_{label}"
            t0 = time.time()
            if not (fam / "family.json").exists():
                # float32 samples and std: the figures of earlier runs were of such
                sample_file(train_dir / "model.pt", sim / "tomo.mrc", fam,
                            SamplerSettings(n, tiles=TileSettings(tile, tile // 3), seed=0),
                            CalibrationSettings(spread_calibration),
                            StorageSettings(sample_dtype="float32", std_dtype="float32",
                                            overwrite=True), **halves)
            t_sample = time.time() - t0
            rep = evaluate_family(fam, sim / "gt.mrc", restored=run / "restored.mrc",
                                  geometry=geo, tomogram=sim / "tomo.mrc",
                                  sim_meta=sim / "meta.json")
            if label == "halves":  # the halves feed only the consistency check's noise
                same = _same_samples(run / "family_nohalves", fam)
                row["halves_samples_identical"] = same
            ss, cov, fm = rep["spread_skill"], rep["coverage"], rep["family_mean"]
            row[label] = {
                "sample_s": t_sample,
                "spread_skill_measured": ss["spread_skill_measured"],
                "spread_skill_wedge": ss["spread_skill_wedge"],
                "coverage_wedge_90": cov["wedge_90"], "coverage_all_90": cov["all_90"],
                "family_pearson": fm["pearson"], "family_cc_wedge": fm["cc_wedge"],
                "crps": rep.get("crps"),
                "wedge_vs_measured": wedge_over_measured(rep, good)}
    run.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=2, default=float))
    return row


def _same_samples(a: Path, b: Path) -> bool:
    """Whether two families hold bit-identical samples."""
    import zarr

    x = zarr.open_array(str(a / "samples.zarr" / "0"), mode="r")
    y = zarr.open_array(str(b / "samples.zarr" / "0"), mode="r")
    return x.shape == y.shape and all(np.array_equal(x[i], y[i]) for i in range(x.shape[0]))


def _model_extra(path: Path) -> dict[str, Any]:
    from cryowae.models.checkpoint import KIND_MODEL, load_state

    return dict(load_state(path, KIND_MODEL).get("extra", {}))


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| seed | variant | sampling | spread/skill measured / wedge | 90% cover wedge "
             "/ all (30 A) | family mean Pearson / wedge CC | single Pearson / wedge CC "
             "| wedge > measured (shells) | fresh-code MMD / null |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["seed"], r["variant"])):
        fm = r.get("family_matching") or {}
        mmd = (f"{fm['family_mmd']:.2g} / {fm['family_mmd_null']:.2g}"
               if fm.get("family_mmd") is not None else "")
        single = f"{_fmt(r['single_pearson'])} / {_fmt(r['single_cc_wedge'])}"
        labels = [k for k in ("nohalves", "halves") if k in r] or [None]
        for label in labels:
            f = r.get(label) or {}
            wm = f.get("wedge_vs_measured") or {}
            lines.append(
                f"| {r['seed']} | {r['variant']} | {label or '-'} | "
                f"{_fmt(f.get('spread_skill_measured'), 2)} / "
                f"{_fmt(f.get('spread_skill_wedge'), 2)} | "
                f"{_fmt(f.get('coverage_wedge_90'), 2)} / {_fmt(f.get('coverage_all_90'), 2)} | "
                f"{_fmt(f.get('family_pearson'))} / {_fmt(f.get('family_cc_wedge'))} | "
                f"{single} | {wm.get('wedge_gt_measured', '')}/{wm.get('shells', '')} | "
                f"{mmd} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--variants", nargs="+", default=["default", "off"],
                    choices=sorted(VARIANT_FLAGS))
    ap.add_argument("--ablations", nargs="*", default=["m1", "match"],
                    choices=sorted(VARIANT_FLAGS))
    ap.add_argument("--ablation-seeds", type=int, nargs="*", default=None,
                    help="seeds for the ablations (default: all seeds)")
    ap.add_argument("--n", type=int, default=16, help="samples per family")
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--halves-seeds", type=int, nargs="*", default=None,
                    help="seeds whose default run also samples with --even/--odd "
                         "(default: all); the halves change only the consistency check")
    ap.add_argument("--spread-calibration", default="auto",
                    help="as `cryowae sample` (none: raw families, e.g. for "
                         "benchmarks/bench_recalibration.py)")
    ap.add_argument("--out", type=Path, default=Path("bench_families_out"))
    ap.add_argument("--single", nargs=2, metavar=("SEED", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.single:
        halves_seeds = a.seeds if a.halves_seeds is None else a.halves_seeds
        row = run_one(a.out, int(a.single[0]), a.single[1], a.minutes, a.n, a.tile,
                      with_halves=int(a.single[0]) in halves_seeds,
                      spread_calibration=a.spread_calibration)
        print(json.dumps(row, default=float), flush=True)
        return
    from cryowae.data.structures import fetch_example_structures

    pdbs = fetch_example_structures(a.out / "structures")
    for seed in a.seeds:
        simulate(a.out, seed, a.size, pdbs)
    abl_seeds = a.seeds if a.ablation_seeds is None else a.ablation_seeds
    jobs = [(s, v) for s in a.seeds for v in a.variants]
    jobs += [(s, v) for s in abl_seeds for v in a.ablations if (s, v) not in jobs]
    threads = max(1, (os.cpu_count() or 1) // a.parallel)

    def launch(job: tuple[int, str]) -> None:
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
                            "CRYOWAE_NO_TENSORBOARD": "1"}
        cmd = [sys.executable, __file__, "--single", str(job[0]), job[1], "--out",
               str(a.out), "--minutes", str(a.minutes), "--n", str(a.n),
               "--tile", str(a.tile), "--seeds", *map(str, a.seeds),
               "--spread-calibration", a.spread_calibration]
        if a.halves_seeds is not None:
            cmd += ["--halves-seeds", *map(str, a.halves_seeds)]
        subprocess.run(cmd, check=True, env=env)

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        list(pool.map(launch, jobs))
    rows = [json.loads((a.out / f"run_seed{s}_{v}" / "result.json").read_text())
            for s, v in jobs]
    (a.out / "results.json").write_text(json.dumps(rows, indent=2, default=float))
    print(table(rows))
    print(f"\ncommand: {command}")
    print(f"runs at once: {a.parallel}, torch threads per run: {threads}, "
          f"cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
