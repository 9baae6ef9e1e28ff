"""`make demo`: the whole job on a small simulated example, with the commands it runs.

    python -m cryowae.demo --out demo_out [--size 64] [--steps 80]

Simulates a tomogram with ground truth, trains a restorer on it (even/odd halves),
restores it, samples a posterior family from the model's stochastic branch (prior
draws), evaluates raw and restored volumes and the family against the ground truth
(printing the calibration line and the family's wedge/measured spread) and writes
``report.md`` with ``report.png``. Each step runs the same `cryowae` command a user
would type, printed before it runs. Then the real-data lane (`cryowae.demo_real`):
the EMPIAR-10164 tomogram inspected, trained on for a few minutes, restored and
sampled, with its ground-truth-free figures and ``real/real.png``. A model trained
without the stochastic branch cannot draw prior samples: the demo says so and samples
test-time rotations instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_command(args: list[Any], capture: bool = False) -> str:
    """Print and run ``cryowae ARGS`` in a subprocess (stdout captured and returned with
    `capture`); a failed step ends the demo."""
    print("$ cryowae " + " ".join(shlex.quote(str(a)) for a in args), flush=True)
    proc = subprocess.run([sys.executable, "-m", "cryowae", *map(str, args)],
                          stdout=subprocess.PIPE if capture else None, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo step failed: cryowae {' '.join(map(str, args))}")
    return proc.stdout or ""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-minutes", type=float, default=2.0,
                    help="training budget of the real-data lane")
    ap.add_argument("--no-real", action="store_true",
                    help="skip the real-data lane (EMPIAR-10164, needs cryowae[demo])")
    a = ap.parse_args(argv)
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sim, run = out / "sim", out / "run"
    restored, family = out / "restored.mrc", out / "family"
    run_command(["simulate", sim, "--size", a.size, "--seed", a.seed, "--overwrite"])
    if run.exists():
        import shutil

        shutil.rmtree(run)
    run_command(["train", sim / "tomo.mrc", "--even", sim / "tomo_even.mrc", "--odd",
          sim / "tomo_odd.mrc", "--out", run, "--steps", a.steps, "--patch-size", 32,
          "--seed", a.seed])
    run_command(["restore", run / "model.pt", sim / "tomo.mrc", "--even", sim / "tomo_even.mrc",
          "--odd", sim / "tomo_odd.mrc", "--out", restored, "--tile", 32, "--overlap", 16,
          "--overwrite"])
    from cryowae.models.checkpoint import load_restorer

    sampler = "prior"
    if getattr(load_restorer(run / "model.pt"), "stochastic", None) is None:
        print("note: the trained model has no stochastic branch, so it cannot draw "
              "posterior samples; the demo samples test-time rotations instead "
              "(--sampler rotations), which are not a calibrated posterior", flush=True)
        sampler = "rotations"
    run_command(["sample", run / "model.pt", sim / "tomo.mrc", "--n", a.samples, "--out", family,
          "--sampler", sampler, "--even", sim / "tomo_even.mrc", "--odd",
          sim / "tomo_odd.mrc", "--tile", 32, "--overlap", 16, "--overwrite"])
    calib = json.loads(run_command(["evaluate", family, "--gt", sim / "gt.mrc", "--restored",
                             restored, "--json"], capture=True))
    metrics = {}
    for label, path in (("raw tomogram", sim / "tomo.mrc"), ("restored", restored),
                        ("posterior mean", family / "mean.mrc")):
        text = run_command(["evaluate", path, "--gt", sim / "gt.mrc", "--json"], capture=True)
        metrics[label] = json.loads(text)
    from cryowae.io import read_volume
    from cryowae.report import slice_figure, write_markdown_report

    vols = {"raw": read_volume(sim / "tomo.mrc").data, "restored": read_volume(restored).data,
            "ground truth": read_volume(sim / "gt.mrc").data,
            "posterior std": read_volume(family / "std.mrc").data}
    slice_figure(out / "report.png", vols, title="cryowae demo: central slices")
    report = write_markdown_report(
        out / "report.md", "cryowae demo", metrics, "report.png",
        notes=[f"simulated {a.size}^3-class tomogram, seed {a.seed}; trained {a.steps} steps",
               f"total time {time.time() - t0:.0f} s"])
    print()
    print(f"{'':16s} {'pearson':>8s} {'cc_measured':>12s} {'cc_wedge':>9s} {'FSC0.143 A':>11s}")
    for label, m in metrics.items():
        print(f"{label:16s} {m['pearson']:8.3f} {m['cc_measured']:12.3f} {m['cc_wedge']:9.3f} "
              f"{m['fsc_0143_A']:11.1f}")
    from cryowae.sampling.consistency import family_lines
    from cryowae.sampling.evaluate import calibration_line

    print(f"\nposterior family ({sampler}, {a.samples} samples): {calibration_line(calib)}")
    for line in family_lines(json.loads((family / "family.json").read_text())):
        print(line)
    print(f"\noutputs in {out}/: report {report}, picture {out / 'report.png'}, "
          f"restoration {restored}, posterior family {family}/ (samples.zarr, mean.mrc, "
          "std.mrc)")
    print(f"look at them in napari: cryowae view {sim / 'tomo.mrc'} {restored} {family}")
    if not a.no_real:
        from cryowae.demo_real import print_real_report, real_lane

        print("\nreal tomogram (EMPIAR-10164, HIV-1 VLPs, no ground truth):")
        print_real_report(real_lane(out / "real", run_command, a.real_minutes,
                                    max(2, a.samples // 2), seed=a.seed), out / "real")
    print(f"demo finished in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
