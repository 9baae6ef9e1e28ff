"""The local spread step applied again to a family `bench_pipelines.py` sampled, scored by
`cryowae evaluate`'s figures before and after (development of the local step: no
retraining, no resampling).

    OMP_NUM_THREADS=1 python benchmarks/bench_local_rescore.py pipe_dev/wbp_seed71 nohalves \
        [--set max_gain=8 exponent=0.75]

CASE is a `bench_pipelines.py` case folder (``sim/``, ``restored.mrc``,
``family_<mode>/``). The family's samples are read, modulated in memory by
`cryowae.sampling.local_spread.localise_family` about the restoration (what `cryowae
sample` does on its store: the two agree, tests/test_local_spread.py), written to a
temporary family folder and evaluated with `evaluate_family` beside the family as
sampled. Prints one Markdown row each: spread/skill measured / wedge, truth outside
[min, max], Gaussian 90 % coverage, ENCE, CRPS over the single restoration's MAE, the
std map's sparsification gain and the three restoration-only maps' gains. ``--set``
overrides fields of `LocalSpreadSettings` (numbers). A family the step has already
modulated is in effect unclipped when modulated again: its variance already follows the
error model within the clip.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def row(label: str, rep: dict) -> str:
    ss, sp = rep["spread_skill"], rep["sparsification"]
    only = " / ".join(f"{sp[k]['gain']:.3f}" for k in
                      ("local_magnitude", "local_deviation", "local_detail_power"))
    return (f"| {label} | {ss['spread_skill_measured']:.2f} / {ss['spread_skill_wedge']:.2f} "
            f"| {rep['outside_range']['fraction']:.3f} | {rep['coverage']['all_90']:.3f} "
            f"| {rep['reliability']['ence']:.3f} "
            f"| {rep['crps']['crps_family'] / rep['crps']['mae_single']:.3f} "
            f"| {sp['std']['gain']:.3f} | {only} |")


def evaluate_in_memory(family: Path, samples: Any, gt: Path, **kw: Any) -> dict:
    """`evaluate_family` of (S, Z, Y, X) `samples` held in memory, as the family folder
    `family` (its family.json) would hold them: written float32 to a temporary copy."""
    import zarr

    from cryowae.sampling.evaluate import evaluate_family

    x = np.asarray(samples, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "family"
        out.mkdir()
        shutil.copy(family / "family.json", out / "family.json")
        z = zarr.open_array(str(out / "samples.zarr" / "0"), mode="w", shape=x.shape,
                            dtype="float32", chunks=(1, *x.shape[1:]))
        z[:] = x
        return evaluate_family(out, gt, **kw)


def main() -> None:
    import zarr

    from cryowae.io import read_volume
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import evaluate_family
    from cryowae.sampling.local_spread import LocalSpreadSettings, localise_family

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("mode", choices=("nohalves", "halves"))
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    a = ap.parse_args()
    settings = LocalSpreadSettings(**{k: int(v) if v.isdigit() else float(v) for k, v in
                                      (item.split("=", 1) for item in a.set)})
    fam = a.case / f"family_{a.mode}"
    sim = a.case / "sim"
    geo = TiltGeometry.from_dict(json.loads((fam / "family.json").read_text())["geometry"])
    samples = np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"), mode="r")[:],
                         np.float32)
    with read_volume(a.case / "restored.mrc") as v:
        restored = v.numpy().astype(np.float32)
    local, info = localise_family(samples, restored, geo, settings)
    kw = dict(restored=a.case / "restored.mrc", tomogram=sim / "tomo.mrc",
              sim_meta=sim / "meta.json")
    print(f"python benchmarks/bench_local_rescore.py {a.case} {a.mode}"
          + (f" --set {' '.join(a.set)}" if a.set else "") + f"; gain {info}")
    print(row(f"{a.case.name} {a.mode} as sampled", evaluate_family(fam, sim / "gt.mrc", **kw)))
    print(row(f"{a.case.name} {a.mode} local step again",
              evaluate_in_memory(fam, local, sim / "gt.mrc", **kw)))


if __name__ == "__main__":
    main()
