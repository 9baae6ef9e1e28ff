"""Which map of the restoration ranks a family mean's errors: sparsification gains.

    python benchmarks/bench_error_maps.py pipe_dev_tail/wbp_seed71 [--mode nohalves]

CASE is a `bench_pipelines.py` case folder (``sim/``, ``restored.mrc``,
``family_<mode>/``). Error: the family mean minus the truth (filtered by |CTF|, on the
data's scale, as `cryowae evaluate`). Maps, each smoothed by a Gaussian of sigma voxels
(`cryowae.metrics.sparsification`): F, the local power of the restoration's measured
component; P, the restoration's own local power G * (R - mean R)^2; F^(1-a) P^a (the
local spread step's feature H, `cryowae.sampling.local_spread`); with ``--residual``
also H plus or times the local power of the data's measured residual (the
least-squares-scaled data's measured component less the restoration's); the oracle
(the error's own smoothed power); the family's own std; and the best of `cryowae
evaluate`'s restoration-only maps (|R| and its detail power, sigma 2). Prints one JSON
line of gains (1 = the oracle's order, 0 = random).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import zarr


def main() -> None:
    from cryowae.metrics.calibration_checks import truth_seen_by_data
    from cryowae.metrics.sparsification import (
        gaussian_smooth,
        local_detail_power_map,
        local_magnitude_map,
        sparsification,
    )
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import _read, truth_ctf, truth_on_data_scale

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("--mode", default="nohalves")
    ap.add_argument("--residual", action="store_true")
    a = ap.parse_args()
    fam, sim = a.case / f"family_{a.mode}", a.case / "sim"
    geo = TiltGeometry.from_dict(json.loads((fam / "family.json").read_text())["geometry"])
    s = torch.from_numpy(np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"),
                                                    mode="r")[:], np.float32))
    g, vs = _read(sim / "gt.mrc", "ground truth")
    d, _ = _read(sim / "tomo.mrc", "tomogram")
    r, _ = _read(a.case / "restored.mrc", "restoration")
    truth, _, _ = truth_on_data_scale(
        truth_seen_by_data(g, vs, truth_ctf(sim / "gt.mrc").params, "abs_ctf"), d, geo)
    err = s.mean(0) - truth
    shape = tuple(r.shape)
    meas = geo.wedge_mask(shape, rfft=True) > 0.5

    def measured(v: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfftn(v.double())
        f[0, 0, 0] = 0
        return torch.fft.irfftn(f * meas, s=shape)

    def gain(u: torch.Tensor) -> float:
        return round(sparsification(u, err).gain, 3)

    rm, rc = measured(r), r.double() - r.double().mean()
    out: dict[str, float] = {}
    for sigma in (0.7, 1.0):
        f = gaussian_smooth(rm**2, sigma).double().clamp_min(1e-30)
        p = gaussian_smooth(rc**2, sigma).double().clamp_min(1e-30)
        out[f"F s{sigma}"], out[f"P s{sigma}"] = gain(f), gain(p)
        for w in (0.33, 0.5, 0.67):
            out[f"F^{1 - w:.2f} P^{w} s{sigma}"] = gain(f ** (1 - w) * p**w)
        out[f"oracle s{sigma}"] = gain(gaussian_smooth(err.double() ** 2, sigma))
    if a.residual:
        h = (gaussian_smooth(rm**2, 1.0).double() * gaussian_smooth(rc**2, 1.0).double()
             ).clamp_min(1e-30).sqrt()
        dm = measured(d)
        res = dm * float((dm * rm).sum() / (dm * dm).sum()) - rm
        for sigma in (1.0, 2.0):
            q = gaussian_smooth(res**2, sigma).double().clamp_min(1e-30)
            for w in (0.25, 0.5, 1.0):
                out[f"H + {w} residual s{sigma}"] = gain(h / h.mean() + w * q / q.mean())
            for b in (0.25, 0.5):
                out[f"H residual^{b} s{sigma}"] = gain(h * q**b)
    out["family std"] = gain(s.std(0))
    out["best restoration-only"] = max(gain(local_magnitude_map(r)),
                                       gain(local_detail_power_map(r)))
    print(f"python benchmarks/bench_error_maps.py {a.case} --mode {a.mode}"
          + (" --residual" if a.residual else ""))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
