"""Does restoring with the running average of the weights beat the last step's weights?

    OMP_NUM_THREADS=1 python benchmarks/bench_weight_average.py --pipeline wbp-hamming \
        --seed 81 --minutes 25 --out bench_avg_out

For one pipeline x seed of the pipeline bench (`cryowae simulate --pipeline P --size 128
--seed S --voxel-size 8`, the five example structures when they can be fetched; held-out
pipelines and seeds are listed in bench_pipelines.py): `cryowae train` on the even/odd
halves for ``--minutes`` (preset cpu-small, as a user runs it), then `cryowae restore`
twice from the same run: with model.pt (the running average of the weights,
`cryowae.training.averaging`) and with the last step's weights (checkpoint.pt's
``weights``, written beside it as model_last.pt with model.pt's metadata). Both
restorations come from one training trajectory, so the difference is the averaging
alone. Scores: Pearson to the ground truth, and the correlation in the measured and
missing-wedge regions of Fourier space (`region_correlations`). Prints one Markdown row
and writes result.json; a finished step is skipped when rerun.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipelines import _run as run  # noqa: E402
from bench_pipelines import cryowae, structures  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="wbp-hamming")
    ap.add_argument("--seed", type=int, default=81)
    ap.add_argument("--minutes", type=float, default=25)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench_avg_out"))
    a = ap.parse_args()

    from cryowae.io import read_volume
    from cryowae.metrics.correlation import pearson
    from cryowae.metrics.fourier_regions import region_correlations
    from cryowae.models.checkpoint import KIND_CHECKPOINT, KIND_MODEL, load_state, save_state
    from cryowae.physics.geometry import TiltGeometry

    base = a.out / f"{a.pipeline}_seed{a.seed}"
    base.mkdir(parents=True, exist_ok=True)
    sim, train, log = base / "sim", base / "train", base / "log.txt"
    if not (sim / "meta.json").exists():
        cmd = cryowae("simulate", sim, "--size", a.size, "--seed", a.seed, "--voxel-size", 8,
                      "--pipeline", a.pipeline, "--overwrite")
        for p in structures(a.out, "auto"):
            cmd += ["--pdb", str(p)]
        run(cmd, log)
    tlt = sim / "tilts.tlt"
    if not (train / "model.pt").exists():
        run(cryowae("train", sim / "tomo.mrc", "--even", sim / "tomo_even.mrc", "--odd",
                    sim / "tomo_odd.mrc", "--tilt-file", tlt, "--out", train, "--minutes",
                    a.minutes, "--seed", a.seed), log)
    model = load_state(train / "model.pt", KIND_MODEL)
    last = train / "model_last.pt"
    if not last.exists():
        ckpt = load_state(train / "checkpoint.pt", KIND_CHECKPOINT)
        save_state(last, model | {"weights": ckpt["weights"]}, KIND_MODEL)
    gt = read_volume(sim / "gt.mrc").numpy()
    geometry = TiltGeometry.from_dict(model["geometry"])
    row = {"pipeline": a.pipeline, "seed": a.seed, "minutes": a.minutes,
           "steps": int(model["extra"]["step"])}
    for name, m in (("average", train / "model.pt"), ("last", last)):
        out = base / f"restored_{name}.mrc"
        if not out.exists():
            run(cryowae("restore", m, sim / "tomo.mrc", "--out", out, "--tilt-file", tlt), log)
        rest = read_volume(out).numpy()
        reg = region_correlations(rest, gt, geometry)
        row[name] = {"pearson": pearson(rest, gt)} | {k: float(v) for k, v in reg.items()}
    (base / "result.json").write_text(json.dumps(row, indent=1))
    av, la = row["average"], row["last"]
    print(json.dumps(row))
    print("| pipeline | seed | steps | " + " | ".join(
        f"{k}, last -> average" for k in av) + " |")
    print(f"| {a.pipeline} | {a.seed} | {row['steps']} | " + " | ".join(
        f"{la[k]:.3f} -> {av[k]:.3f}" for k in av) + " |")
    print(f"command: OMP_NUM_THREADS=1 python benchmarks/bench_weight_average.py --pipeline "
          f"{a.pipeline} --seed {a.seed} --minutes {a.minutes:g} --out {a.out}")


if __name__ == "__main__":
    main()
