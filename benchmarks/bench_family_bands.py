"""Where in frequency a family's per-voxel variance and its mean's squared error sit.

    python benchmarks/bench_family_bands.py pipe_dev_tail/wbp_seed72 [--mode nohalves]

CASE is a `bench_pipelines.py` case folder (``sim/``, ``family_<mode>/``). Per band of
|k| (cycles/voxel; the last band holds the box's corners beyond Nyquist) and Fourier
region (measured, wedge): the family's deviation power (ddof 1) and the family mean's
error power against the truth (filtered by |CTF| and put on the data's scale, as
`cryowae evaluate` does), each as a fraction of its total, and their ratio. The first
line gives the total variance over the total error power (1 for a family as wide as its
error).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import zarr

EDGES = (0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.9)


def main() -> None:
    from cryowae.metrics.calibration_checks import truth_seen_by_data
    from cryowae.physics.fourier import radial_frequency
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import _read, truth_ctf, truth_on_data_scale

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("--mode", default="nohalves")
    a = ap.parse_args()
    fam, sim = a.case / f"family_{a.mode}", a.case / "sim"
    geo = TiltGeometry.from_dict(json.loads((fam / "family.json").read_text())["geometry"])
    s = torch.from_numpy(np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"),
                                                    mode="r")[:], np.float32)).double()
    g, vs = _read(sim / "gt.mrc", "ground truth")
    d, _ = _read(sim / "tomo.mrc", "tomogram")
    truth, _, _ = truth_on_data_scale(
        truth_seen_by_data(g, vs, truth_ctf(sim / "gt.mrc").params, "abs_ctf"), d, geo)
    mean = s.mean(0)
    shape = tuple(mean.shape)
    k = radial_frequency(shape, rfft=False).double()
    m = geo.wedge_mask(shape, rfft=False) > 0.5
    dev = torch.fft.fftn(s - mean, dim=(-3, -2, -1)).abs().square().sum(0) / (s.shape[0] - 1)
    err = torch.fft.fftn(mean - truth.double()).abs().square()
    tv, te = float(dev.sum()), float(err.sum())
    print(f"python benchmarks/bench_family_bands.py {a.case} --mode {a.mode}")
    print(f"total variance / error power {tv / te:.3f}")
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        band = (k >= lo) & (k < hi)
        for name, region in (("measured", band & m), ("wedge", band & ~m)):
            v, e = float(dev[region].sum()), float(err[region].sum())
            print(f"  {lo:.2f}-{hi:.2f} {name:8s} variance {v / tv:.3f}  error {e / te:.3f}"
                  f"  ratio {v / max(e, 1e-30):.2f}")


if __name__ == "__main__":
    main()
