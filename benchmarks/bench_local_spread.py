"""Local spread and the self-check on a simulated tomogram (issue 21, items 2 and 4).

Reads a family of ``cryowae sample`` (calibrated per shell), its model and the
simulation, applies the local step (`cryowae.sampling.local_spread.localise_family`)
and scores, against the ground truth filtered by |CTF| on the data's scale (as
`cryowae evaluate`): spread/skill per region, the std map's sparsification gain (oracle
1, random 0) beside the restoration-only maps', ENCE, and how much the std and the
error vary across voxels (coefficient of variation of 4-voxel-smoothed maps). The
self-check (`cryowae.sampling.selfcheck.self_check`) runs on the family as sampled, the
localised one, and the family's deviations scaled by 2 and by 0.5, beside the
ground-truth verdict.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_local_spread.py \
        --sim /tmp/h8/sim91 --family /tmp/h8/fam91 --model /tmp/h8/train91/model.pt \
        --out /tmp/h8/local91.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load(sim: Path, family: Path) -> dict[str, Any]:
    from bench_recalibration import load_family

    return load_family(sim, family)


def _cv(v: torch.Tensor) -> float:
    from cryowae.metrics.sparsification import gaussian_smooth

    s = gaussian_smooth(v.double(), 4.0)
    return float(s.std() / s.mean())


def score(samples: torch.Tensor, truth: torch.Tensor, geo: Any) -> dict[str, Any]:
    from cryowae.metrics.calibration import spread_skill
    from cryowae.metrics.sparsification import sparsification
    from cryowae.metrics.uncertainty import predicted_std, reliability

    mean, std = samples.mean(0), samples.std(0)
    err = mean - truth
    ss = spread_skill(samples, truth, geo)
    return {"spread_skill": ss.ratio, "measured": ss.ratio_measured,
            "wedge": ss.ratio_wedge,
            "gain": sparsification(std, err).gain,
            "ence": reliability(predicted_std(std, samples.shape[0]), err).ence,
            "std_cv": _cv(std), "error_cv": _cv(err.abs())}


def main() -> None:
    from cryowae.inference.restore import restore_array
    from cryowae.io.stats import volume_stats
    from cryowae.metrics.sparsification import (
        local_detail_power_map,
        local_deviation_map,
        sparsification,
    )
    from cryowae.models.checkpoint import load_restorer
    from cryowae.physics.crop import central_box, crop_of
    from cryowae.sampling.consistency import CHECK_EDGE
    from cryowae.sampling.extra_wedge import extra_wedge_task
    from cryowae.sampling.local_spread import LocalSpreadSettings, localise_family
    from cryowae.sampling.selfcheck import self_check

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", type=Path, required=True)
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=21)
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    c = load(a.sim, a.family)
    geo, data, truth = c["geometry"], c["data"], c["truth"]
    restorer = load_restorer(a.model, "cpu")
    restore = partial(restore_array, restorer, tile=a.tile, overlap=a.overlap, batch_size=4,
                      norm=volume_stats(data.numpy()))
    st = LocalSpreadSettings(window_sigma=a.window)
    fam = c["samples"]
    # the centre of `cryowae sample`'s local step: the mean path's restoration
    centre = torch.as_tensor(np.asarray(restore(data.numpy()), np.float32))
    t0 = time.perf_counter()
    local, info = localise_family(fam, centre.numpy(), geo, st)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    err = centre - truth
    res: dict[str, Any] = {"local_step": info, "restoration_only_gain": {
        "local_deviation": sparsification(local_deviation_map(centre), err).gain,
        "local_detail_power": sparsification(local_detail_power_map(centre), err).gain}}
    crop = central_box(tuple(data.shape), CHECK_EDGE, even=True)
    task = extra_wedge_task(restore, crop_of(data, crop).numpy(), geo, None, st)
    mean = fam.mean(0)
    variants = {"per_shell": fam, "local": local, "per_shell_x2": mean + 2 * (fam - mean),
                "per_shell_x0.5": mean + 0.5 * (fam - mean)}
    for name, v in variants.items():
        row = score(v, truth, geo)
        chk = self_check(v, data, geo, restore, settings=st, task=task)
        truth_ok = all(0.8 <= row[k] <= 1.25 for k in ("measured", "wedge"))
        row |= {"self_check": chk["spread_skill"], "self_verdict": chk["verdict"],
                "self_local_rank": chk["local_rank_correlation"],
                "truth_verdict": "agrees" if truth_ok else "disagrees", "line": chk["line"]}
        res[name] = row
        print(f"{name}: spread/skill {row['measured']:.2f} measured / {row['wedge']:.2f} "
              f"wedge ({row['spread_skill']:.2f} all); sparsification gain {row['gain']:.2f}; "
              f"ENCE {row['ence']:.2f}; std CV {row['std_cv']:.2f} (error CV "
              f"{row['error_cv']:.2f}); self-check {chk['spread_skill']['measured']:.2f} / "
              f"{chk['spread_skill']['wedge']:.2f} -> {chk['verdict']} (truth: "
              f"{row['truth_verdict']}); local rank {chk['local_rank_correlation']:.2f}",
              flush=True)
    print(f"restoration-only gains: {res['restoration_only_gain']}; local step {info}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
