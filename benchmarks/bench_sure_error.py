"""SURE's error per shell against the restoration's true error, and the no-halves noise
estimate against the tomogram-minus-truth power, on the central crop of a
`bench_pipelines.py` case (what the per-shell spread calibration reads; issue 21).

    OMP_NUM_THREADS=2 python benchmarks/bench_sure_error.py pipe_dev/fourier_seed71

CASE holds ``sim/`` (tomo.mrc, gt.mrc, meta.json), ``train/model.pt`` and a family
folder (``family_nohalves/family.json``, for the geometry). On the 96^3 central crop
(`cryowae.sampling.consistency.CHECK_EDGE`, as the calibration): the noise of
`cryowae.training.slab_noise.crop_noise` (empty Z slabs, else the ramp fit: its source
is printed), `sure_shell_error` of the model's restoration, and per shell of the
measured region the mean power per coefficient (ortho FFT) of the restoration minus the
truth (the truth filtered by |CTF| and put on the data's scale, as `cryowae evaluate`)
and of the tomogram minus that truth (the noise plus what the truth model misses: an
upper bound on the noise). Prints every third shell. Then, per band of 0.05 cycles/voxel,
the tomogram-minus-truth power in the self-check's extra-wedge band B (the measured
region less a wedge rotated 90 degrees about Z, `extra_wedge_task`) over that in the
whole measured region: 1 where the noise is isotropic within a shell, as the per-shell
noise the self-check subtracts in B assumes.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from cryowae.inference.restore import restore_array
    from cryowae.io.stats import volume_stats
    from cryowae.metrics.calibration import SpectralGrid, shell_frequencies
    from cryowae.metrics.calibration_checks import truth_seen_by_data
    from cryowae.models.checkpoint import load_restorer
    from cryowae.physics.crop import central_box, crop_of
    from cryowae.physics.fourier import radial_frequency
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.consistency import CHECK_EDGE
    from cryowae.sampling.evaluate import _read, truth_ctf, truth_on_data_scale
    from cryowae.sampling.extra_wedge import extra_wedge_band
    from cryowae.sampling.sure import sure_shell_error
    from cryowae.training.slab_noise import crop_noise

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path)
    ap.add_argument("--family", default="family_nohalves")
    a = ap.parse_args()
    sim = a.case / "sim"
    meta = json.loads((a.case / a.family / "family.json").read_text())
    geo = TiltGeometry.from_dict(meta["geometry"])
    d, vs = _read(sim / "tomo.mrc", "tomogram")
    g, _ = _read(sim / "gt.mrc", "ground truth")
    seen = truth_seen_by_data(g, vs, truth_ctf(sim / "gt.mrc").params, "abs_ctf")
    truth, _, _ = truth_on_data_scale(seen, d, geo)
    model = load_restorer(a.case / "train" / "model.pt", torch.device("cpu"))
    restore = functools.partial(restore_array, model, tile=64, overlap=21,
                                norm=volume_stats(d.numpy()))
    crop = central_box(tuple(d.shape), CHECK_EDGE, even=True)
    dc, tc = crop_of(d.numpy(), crop), crop_of(truth.numpy(), crop)
    noise = crop_noise(d.numpy(), crop, geo, dc)
    sure = np.asarray(sure_shell_error(restore, dc.numpy(), geo, noise, seed=0).error)
    r = torch.as_tensor(np.asarray(restore(dc.numpy()), np.float32))
    grid = SpectralGrid.of(tuple(dc.shape), geo)
    ones = torch.ones(grid.measured.shape)
    count = grid.shell_sums(ones, grid.measured)

    def shell_power(v: torch.Tensor) -> np.ndarray:
        p = torch.fft.rfftn(v.double(), norm="ortho").abs().square()
        with np.errstate(invalid="ignore", divide="ignore"):
            return grid.shell_sums(p, grid.measured) / count

    err, excess = shell_power(r - tc), shell_power(dc - tc)
    f = shell_frequencies(tuple(dc.shape))
    est = noise.at(torch.as_tensor(f)).numpy()
    print(f"python benchmarks/bench_sure_error.py {a.case}")
    print(f"noise: {noise.source}")
    print("| cycles/voxel | SURE error | true error | SURE / true | noise estimate "
          "| tomogram - truth | estimate / (tomogram - truth) |")
    print("|---|---|---|---|---|---|---|")
    for i in range(1, len(f), 3):
        print(f"| {f[i]:.3f} | {sure[i]:.4f} | {err[i]:.4f} | {sure[i] / err[i]:.2f} "
              f"| {est[i]:.4f} | {excess[i]:.4f} | {est[i] / excess[i]:.2f} |")
    shape = tuple(dc.shape)
    m = grid.measured > 0.5
    band = extra_wedge_band(shape, geo)
    power = torch.fft.rfftn((dc - tc).double(), norm="ortho").abs().square()
    k = radial_frequency(shape, rfft=True)
    cells = []
    for lo in np.arange(0.05, 0.5, 0.05):
        sh = (k >= lo) & (k < lo + 0.05)
        cells.append(f"{lo:.2f}-{lo + 0.05:.2f}: "
                     f"{float(power[sh & band].mean()) / float(power[sh & m].mean()):.2f}")
    print("tomogram - truth, band B / measured region: " + ", ".join(cells))


if __name__ == "__main__":
    main()
