"""Rules for the spread calibration's high-frequency tail, tried on a sampled family.

    python benchmarks/bench_tail_rules.py pipe_dev_slab/wbp_seed72 none median below4 one

CASE is a `bench_pipelines.py` case folder whose ``family_nohalves/family.json`` holds
the per-shell factors and SURE's terms (`cryowae sample`'s record). The tail starts at
the first shell past the peak of the restoration's transfer (SURE's divergence over the
noise) where it is under `cryowae.sampling.recalibrate.TAIL_TRANSFER`. Rules for the
tail's factor: ``none`` (as sampled), ``median`` (of the tail's factors), ``below4``
(median of the four shells below the tail), ``one`` (the branch's own spread). Each
sample's deviation from the family mean is rescaled per |k| by new factor / old (the
box's corners take the last shell's), the local spread step is run again in memory
(`localise_family`), and `cryowae evaluate`'s figures are printed as one Markdown row
per rule (`bench_local_rescore.row`). The factors of a family sampled before the tail
was pooled (main 81ca628 and earlier) are what this compares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import zarr
from bench_local_rescore import evaluate_in_memory, row

RULES = ("none", "median", "below4", "one")


def tail_factors(old: np.ndarray, transfer: np.ndarray, rule: str) -> tuple[np.ndarray, int]:
    """The factors with the tail set by `rule`, and the tail's first shell."""
    from cryowae.sampling.recalibrate import TAIL_TRANSFER

    peak = int(np.nanargmax(transfer))
    below = np.flatnonzero((np.arange(transfer.size) > peak) & np.isfinite(transfer)
                           & (transfer < TAIL_TRANSFER))
    start = int(below[0]) if below.size else old.size
    new = old.copy()
    if rule == "median":
        new[start:] = np.median(old[start:])
    elif rule == "below4":
        new[start:] = np.median(old[max(1, start - 4):start])
    elif rule == "one":
        new[start:] = 1.0
    return new, start


def main() -> None:
    from cryowae.io import read_volume
    from cryowae.physics.fourier import radial_frequency
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.local_spread import localise_family

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("rules", nargs="+", choices=RULES)
    a = ap.parse_args()
    fam, sim = a.case / "family_nohalves", a.case / "sim"
    meta = json.loads((fam / "family.json").read_text())
    geo = TiltGeometry.from_dict(meta["geometry"])
    cal = meta["spread_calibration"]
    freq = np.asarray(cal["factors"]["frequency"])
    old = np.asarray(cal["factors"]["measured"])
    sure = cal["estimate"]["sure"]
    with np.errstate(invalid="ignore", divide="ignore"):
        transfer = np.asarray(sure["divergence"]) / np.asarray(sure["noise"])
    transfer[0] = np.nan
    raw = torch.from_numpy(np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"),
                                                      mode="r")[:], np.float32))
    mean = raw.mean(0)
    shape = tuple(raw.shape[1:])
    k = radial_frequency(shape, rfft=True).double().numpy()
    with read_volume(a.case / "restored.mrc") as v:
        restored = v.numpy().astype(np.float32)
    kw = dict(restored=a.case / "restored.mrc", tomogram=sim / "tomo.mrc",
              sim_meta=sim / "meta.json")
    print(f"python benchmarks/bench_tail_rules.py {a.case} {' '.join(a.rules)}")
    for rule in a.rules:
        new, start = tail_factors(old, transfer, rule)
        ratio = np.where(old > 0, new / np.maximum(old, 1e-12), 1.0)
        rmap = torch.from_numpy(np.interp(k, freq, ratio)).float()
        rmap[0, 0, 0] = 1.0
        x = mean + torch.fft.irfftn(torch.fft.rfftn(raw - mean, dim=(-3, -2, -1)) * rmap,
                                    s=shape, dim=(-3, -2, -1))
        local, _ = localise_family(x.numpy(), restored, geo)
        label = f"{a.case.name} {rule} (tail from {freq[min(start, freq.size - 1)]:.3f})"
        print(row(label, evaluate_in_memory(fam, local, sim / "gt.mrc", **kw)))


if __name__ == "__main__":
    main()
