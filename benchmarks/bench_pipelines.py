"""Pipeline benchmark: posterior families on tomograms reconstructed the ways labs do.

    python benchmarks/bench_pipelines.py --split dev --minutes 10 --out bench_pipe
    python benchmarks/bench_pipelines.py --split heldout --minutes 10 --out bench_pipe

Development and held-out sets (also in docs/benchmarks.md, "Pipeline benchmark"):

- ``dev``: pipelines ``wbp`` (the default simulator: WBP, ramp) and ``fourier``
  (direct Fourier insertion with sampling-weight division), seeds 71 and 72. Develop
  and tune on these only.
- ``heldout``: every other pipeline of `cryowae simulate --pipeline list`
  (``wbp-hamming``, ``wbp-cosine``, ``sirt-like``, ``fourier-floor1``, ``wbp-rawctf``,
  ``wbp-frames``, ``wbp-bin2-mean``, ``wbp-bin2-fourier``, ``wbp-damage``, ``wbp-dose``,
  ``fourier-lab``), seeds 81 and 82. Nobody tunes on these: they are run once, for the
  final table.

For each pipeline x seed, as command lines (all through ``python -m cryowae``):
``simulate`` (``--size``, 8 A voxels, ``--empty-planes`` planes at each Z face without
objects, as in a reconstruction thicker than its specimen, the example protein
structures when they can be fetched, else procedural species; CTF, 120 e/A^2, -60..60
step 3), ``train`` on the
halves (``--even/--odd``, ``--minutes``), ``restore``, ``sample --n`` without
(``nohalves``) and with the halves (``halves``: ``--even/--odd``, the noise of the
spread calibration and the consistency check from the halves), and
``evaluate FAMILY --gt gt.mrc --restored --tomogram --sim-meta --json``. Every step is
skipped when its output exists (the CLI writes atomically), so an interrupted run
resumes; an interrupted training is started again. One row per pipeline x seed x mode,
with whichever of the evaluation's keys are present (`COLUMNS`, looked up with
defaults, and any further key naming outside-range fractions, ENCE or sparsification).
Prints a Markdown table and the command; writes results.json.

    python benchmarks/bench_pipelines.py --spectra --size 64 --seeds 0

``--spectra`` instead checks each pipeline's noise (no training): the scene is
simulated with and without counting noise (same seed, same scene), the exact noise of
``tomo`` is their difference, and its mean power per coefficient in the measured region
is printed per shell, relative to the shell at 0.1 cycles/voxel, with the log-log slope
over 0.15-0.45 cycles/voxel (1 for a |k| ramp, 0 for flat) and the median over those
shells of the halves' estimate ``|(even - odd) / 2|^2`` over the exact noise power,
and the noise-free tomogram's power in the missing wedge over the truth's there
("wedge kept": 0 for a reconstruction that leaves the wedge empty).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEV_PIPELINES = ("wbp", "fourier")
DEV_SEEDS = (71, 72)
HELDOUT_SEEDS = (81, 82)
MODES = ("nohalves", "halves")

#: (label, dotted key in the evaluate JSON) shown when present
COLUMNS = (
    ("ss meas", "spread_skill.spread_skill_measured"),
    ("ss wedge", "spread_skill.spread_skill_wedge"),
    ("cov90 all", "coverage.all_90"),
    ("cov90 wedge", "coverage.wedge_90"),
    ("crps", "crps.crps_family"),
    ("single mae", "crps.mae_single"),
    ("mean r", "family_mean.pearson"),
    ("mean cc wedge", "family_mean.cc_wedge"),
)
#: further scalar keys are shown when their dotted name contains one of these
EXTRA_KEY_PARTS = ("outside", "ence", "sparsif")


def held_out_pipelines() -> tuple[str, ...]:
    from cryowae.simulation.pipelines import PIPELINES

    return tuple(n for n in PIPELINES if n not in DEV_PIPELINES)


def _run(cmd: list[str], log: Path) -> None:
    """Run a cryowae command line; its output goes to `log`; a failure raises with the
    log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def cryowae(*args: Any) -> list[str]:
    return [sys.executable, "-m", "cryowae", *(str(a) for a in args)]


def run_one(out: Path, pipeline: str, seed: int, a: argparse.Namespace,
            pdbs: list[Path]) -> list[dict[str, Any]]:
    """All steps for one pipeline and seed; one row per sampling mode."""
    base = out / f"{pipeline}_seed{seed}"
    sim, log = base / "sim", base / "log.txt"
    timing: dict[str, float] = {}

    def step(name: str, done: Path, cmd: list[str]) -> None:
        if done.exists():
            return
        t0 = time.time()
        _run(cmd, log)
        timing[name] = round(time.time() - t0, 1)

    sim_cmd = cryowae("simulate", sim, "--size", a.size, "--seed", seed, "--voxel-size", 8,
                      "--empty-planes", a.empty_planes, "--pipeline", pipeline,
                      "--overwrite")
    for p in pdbs:
        sim_cmd += ["--pdb", str(p)]
    step("simulate", sim / "meta.json", sim_cmd)
    tlt = sim / "tilts.tlt"
    train = base / "train"
    if not (train / "model.pt").exists() and train.exists():
        shutil.rmtree(train)  # an interrupted training starts again
    step("train", train / "model.pt", cryowae(
        "train", sim / "tomo.mrc", "--even", sim / "tomo_even.mrc", "--odd",
        sim / "tomo_odd.mrc", "--tilt-file", tlt, "--out", train, "--minutes", a.minutes,
        "--seed", seed, "--device", a.device,
        *(["--patch-size", a.patch_size] if a.patch_size else [])))
    model = train / "model.pt"
    restored = base / "restored.mrc"
    step("restore", restored, cryowae("restore", model, sim / "tomo.mrc", "--out", restored,
                                      "--tilt-file", tlt, "--tile", a.tile, "--device",
                                      a.device))
    rows = []
    for mode in a.modes:
        fam = base / f"family_{mode}"
        halves = (["--even", sim / "tomo_even.mrc", "--odd", sim / "tomo_odd.mrc"]
                  if mode == "halves" else [])
        step(f"sample_{mode}", fam / "family.json", cryowae(
            "sample", model, sim / "tomo.mrc", "--n", a.n, "--out", fam, "--seed", 0,
            "--tilt-file", tlt, "--tile", a.tile, "--device", a.device, *halves))
        report = base / f"evaluate_{mode}.json"
        step(f"evaluate_{mode}", report, cryowae(
            "evaluate", fam, "--gt", sim / "gt.mrc", "--restored", restored, "--tomogram",
            sim / "tomo.mrc", "--sim-meta", sim / "meta.json", "--tilt-file", tlt,
            "--json", "--out", report))
        rows.append({"pipeline": pipeline, "seed": seed, "mode": mode,
                     "report": json.loads(report.read_text()), "seconds": timing})
    return rows


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Scalar leaves of a nested dict as {"a.b.c": value} (lists are left out)."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool) or d is None:
        out[prefix[:-1]] = d
    return out


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """`COLUMNS` present in any report, then the extra keys (`EXTRA_KEY_PARTS`)."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(flatten(r["report"])))
    cols = [(label, key) for label, key in COLUMNS if key in keys]
    shown = {k for _, k in cols}
    cols += [(k, k) for k in keys
             if k not in shown and any(p in k.lower() for p in EXTRA_KEY_PARTS)]
    return cols


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    head = "| pipeline | seed | mode | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for r in sorted(rows, key=lambda r: (r["pipeline"], r["seed"], r["mode"])):
        flat = flatten(r["report"])
        lines.append(f"| {r['pipeline']} | {r['seed']} | {r['mode']} | "
                     + " | ".join(_fmt(flat.get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def structures(out: Path, want: str) -> list[Path]:
    """The example protein structures (``auto``: when they can be fetched)."""
    if want == "none":
        return []
    from cryowae.data.structures import fetch_example_structures
    from cryowae.errors import CryowaeInputError

    try:
        return fetch_example_structures(out / "structures")
    except CryowaeInputError as exc:
        print(f"procedural species (example structures unavailable: {exc})", flush=True)
        return []


def noise_spectra(pipelines: list[str], seed: int, size: int) -> str:
    """The ``--spectra`` table (see the module docstring)."""
    import numpy as np
    import torch

    from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
    from cryowae.simulation import SimulationConfig, simulate_tomogram
    from cryowae.simulation.pipelines import get_pipeline

    at = (0.05, 0.2, 0.3, 0.4, 0.45)
    lines = ["| pipeline | " + " | ".join(f"P({k:g})/P(0.1)" for k in at)
             + " | slope 0.15-0.45 | halves / exact | wedge kept |",
             "|" + "---|" * (len(at) + 4)]
    for name in pipelines:
        p = get_pipeline(name)
        cfg = SimulationConfig(size=size, seed=seed, voxel_size=8.0)
        noisy = simulate_tomogram(cfg, pipeline=p)
        clean = simulate_tomogram(SimulationConfig(size=size, seed=seed, voxel_size=8.0,
                                                   noise=False), pipeline=p)
        sg = SpectralGrid.of(cfg.shape, cfg.geometry)
        count = np.maximum(sg.shell_sums(torch.ones(sg.labels.shape), sg.measured), 1)

        def power(v: torch.Tensor, sg=sg, count=count) -> np.ndarray:
            f = torch.fft.rfftn(v.double(), norm="ortho").abs() ** 2
            return sg.shell_sums(f, sg.measured) / count

        exact = power(noisy["tomo"] - clean["tomo"])
        halves = power(0.5 * (noisy["tomo_even"] - noisy["tomo_odd"]))
        k = shell_frequencies(cfg.shape)
        idx = [int(np.argmin(abs(k - f))) for f in at]
        ref = exact[int(np.argmin(abs(k - 0.1)))]
        band = (k >= 0.15) & (k <= 0.45)
        slope = np.polyfit(np.log(k[band]), np.log(exact[band]), 1)[0]
        ratio = np.median(halves[band] / exact[band])
        missing = cfg.geometry.wedge_mask(cfg.shape, rfft=True) < 0.5
        fc, fg = (torch.fft.rfftn(v.double()).abs() ** 2 for v in (clean["tomo"], clean["gt"]))
        kept = float(fc[missing].sum() / fg[missing].sum())
        lines.append(f"| {name} | " + " | ".join(f"{exact[i] / ref:.2f}" for i in idx)
                     + f" | {slope:.2f} | {ratio:.2f} | {kept:.3f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev", "heldout"), default="dev",
                    help="dev: wbp, fourier x seeds 71, 72; heldout: the other pipelines "
                         "x seeds 81, 82 (never tune on these)")
    ap.add_argument("--pipelines", nargs="+", help="instead of the split's pipelines")
    ap.add_argument("--seeds", type=int, nargs="+", help="instead of the split's seeds")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--empty-planes", type=int, default=16,
                    help="planes at each Z face without objects (`cryowae simulate "
                         "--empty-planes`): 16 of the 80 at --size 128")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--n", type=int, default=16, help="samples per family")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--patch-size", type=int, default=None,
                    help="training patch (default: the preset's; small --size needs less)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--structures", choices=("auto", "none"), default="auto")
    ap.add_argument("--out", type=Path, default=Path("bench_pipelines_out"))
    ap.add_argument("--spectra", action="store_true",
                    help="only the noise-spectrum check of every pipeline (first seed)")
    a = ap.parse_args()
    command = "python " + " ".join(sys.argv)
    if a.spectra:
        from cryowae.simulation.pipelines import PIPELINES

        print(noise_spectra(a.pipelines or list(PIPELINES), (a.seeds or [0])[0], a.size))
        print()
        print(command)
        return
    dev = a.split == "dev"
    pipelines = a.pipelines or list(DEV_PIPELINES if dev else held_out_pipelines())
    seeds = a.seeds or list(DEV_SEEDS if dev else HELDOUT_SEEDS)
    if dev and (set(seeds) & set(HELDOUT_SEEDS) or set(pipelines) - set(DEV_PIPELINES)):
        print("note: held-out pipelines or seeds in a dev run; do not tune on them",
              flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    pdbs = structures(a.out, a.structures)
    rows: list[dict[str, Any]] = []
    for pipeline in pipelines:
        for seed in seeds:
            new = run_one(a.out, pipeline, seed, a, pdbs)
            rows += new
            print("\n".join(table(new).splitlines()[2:]), flush=True)
    (a.out / "results.json").write_text(json.dumps(
        {"command": command, "rows": rows}, indent=1, default=float))
    print()
    print(table(rows))
    print()
    print(command)


if __name__ == "__main__":
    main()
