"""The real-data lane of `make demo`: the EMPIAR-10164 tomogram (`cryowae.data.samples`)
end to end, with the commands a user would type.

    python -m cryowae.demo_real --out demo_out/real [--minutes 2] [--samples 4]

Inspects the TIFF (voxel size given, since the file stores none), trains a restorer on
it for a few minutes (no halves exist), restores it, samples a small posterior family
and prints the ground-truth-free figures of the restoration (`cryowae evaluate RESTORED
--tomogram RAW` with the Gag-lattice annotation). Writes ``real.png``: XY and XZ
sections of the raw tomogram, the restoration and the family's std.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Runner = Callable[..., str]


def print_real_report(report: dict[str, Any], out: Path) -> None:
    """The lane's closing lines (the evaluation's table was printed by its command)."""
    print(f"real-data outputs in {out}/: sections {out / 'real.png'}, wedge check "
          f"{out / 'inspect.png'}, restoration {out / 'restored.mrc'}, family "
          f"{out / 'family'}/, figures {out / 'evaluate.json'}, training curve "
          f"{out / 'run' / 'training_curve.png'}")


def real_lane(out: Path, run: Runner, minutes: float = 2.0, samples: int = 4,
              steps: int | None = None, seed: int = 0,
              sample_options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the lane into `out` with `run` (``run(args, capture=False) -> stdout``, the
    demo's command runner); returns the evaluation's JSON with the lines `cryowae
    sample` printed (``sample_report``). `steps` (tests) replaces the `minutes` budget;
    `sample_options` are added to `cryowae sample` (tests: skip the calibration)."""
    from cryowae.data.samples import empiar_10164

    real = empiar_10164()
    out.mkdir(parents=True, exist_ok=True)
    tomo, vs = real.tomogram, real.voxel_size
    tilt = ["--tilt-min", real.tilt_range[0], "--tilt-max", real.tilt_range[1]]
    model_dir, restored, family = out / "run", out / "restored.mrc", out / "family"
    run(["inspect", tomo, "--voxel-size", vs, "--png", out / "inspect.png"])
    if model_dir.exists():
        shutil.rmtree(model_dir)
    budget = ["--steps", steps] if steps is not None else ["--minutes", minutes]
    run(["train", tomo, "--voxel-size", vs, *tilt, "--out", model_dir, *budget,
         "--patch-size", 32, "--seed", seed])
    run(["restore", model_dir / "model.pt", tomo, "--voxel-size", vs, "--out", restored,
         "--overwrite"])
    sample_report = run(["sample", model_dir / "model.pt", tomo, "--voxel-size", vs,
                         "--n", samples, "--out", family, "--overwrite", *sample_options],
                        capture=True)
    print(sample_report, end="", flush=True)
    run(["evaluate", restored, "--tomogram", tomo, "--voxel-size", vs, *tilt,
         "--normals", real.vectors, "--annotation-scale", real.annotation_scale,
         "--out", out / "evaluate.json"])
    report = json.loads((out / "evaluate.json").read_text())
    report["sample_report"] = sample_report.splitlines()
    from cryowae.io import read_volume
    from cryowae.report import slice_figure

    vols = {"raw (EMPIAR-10164)": read_volume(tomo, voxel_size=vs).data,
            "restored": read_volume(restored).data,
            "posterior std": read_volume(family / "std.mrc").data}
    slice_figure(out / "real.png", vols, title="cryowae on a real tomogram: central sections")
    return report


def main(argv: list[str] | None = None) -> None:
    from cryowae.demo import run_command

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out/real"))
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--samples", type=int, default=4)
    a = ap.parse_args(argv)
    t0 = time.time()
    print_real_report(real_lane(a.out, run_command, a.minutes, a.samples), a.out)
    print(f"real-data lane finished in {time.time() - t0:.0f} s; picture {a.out / 'real.png'}")


if __name__ == "__main__":
    main()
