"""The PNG of a family's calibration report (`cryowae evaluate FAMILY --png`).

Three panels drawn from the report dict of `cryowae.sampling.evaluate.evaluate_family`
(nothing is recomputed): the reliability diagram (RMSE of the family mean against the
predicted std per std-quantile bin, both in the volume's intensity units, log-log, the
diagonal = calibrated), the sparsification curves (RMSE of the voxels left against the
fraction removed, for the std map, the oracle, the restoration-only maps and a random
order) and spread/skill per shell in the measured and the wedge region (against
spatial frequency in 1/Angstrom; 1 = calibrated).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

_CURVES = (("std", "family std", "C0"),
           ("local_magnitude", "restoration: local magnitude", "C1"),
           ("local_deviation", "restoration: local deviation", "C2"),
           ("local_detail_power", "restoration: local detail power", "C4"))


def calibration_figure(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the three-panel PNG of `report` to `path` (atomically) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryowae.report import save_figure

    fig, (ax_rel, ax_sp, ax_ss) = plt.subplots(1, 3, figsize=(15, 4.4))
    rel = np.asarray(report["reliability"]["bins"], dtype=np.float64)
    rmv, rmse = rel[:, 0], rel[:, 1]
    ok = (rmv > 0) & (rmse > 0)
    lo = float(min(rmv[ok].min(), rmse[ok].min())) if ok.any() else 1e-3
    hi = float(max(rmv[ok].max(), rmse[ok].max())) if ok.any() else 1.0
    ax_rel.plot([lo, hi], [lo, hi], "k--", lw=1, label="calibrated")
    ax_rel.plot(rmv[ok], rmse[ok], "o-", color="C0",
                label=f"family (ENCE {report['reliability']['ence']:.2f})")
    ax_rel.set(xscale="log", yscale="log", xlabel="predicted std (RMV per bin)",
               ylabel="RMSE of the family mean per bin",
               title=f"reliability ({len(rmv)} std-quantile bins)")
    ax_rel.legend(fontsize=8)

    sp = report["sparsification"]
    for key, label, colour in _CURVES:
        c = np.asarray(sp[key]["curve"], dtype=np.float64)
        ax_sp.plot(c[:, 0], c[:, 1], color=colour,
                   label=f"{label} (gain {sp[key]['gain']:.2f})")
    c = np.asarray(sp["std"]["curve"], dtype=np.float64)
    ax_sp.plot(c[:, 0], c[:, 3], "k-", lw=1, label="oracle |error|")
    ax_sp.axhline(sp["std"]["random_rmse"], color="grey", ls="--", lw=1, label="random")
    ax_sp.set(xlabel="fraction of voxels removed", ylabel="RMSE of the voxels left",
              title="sparsification (error of the family mean)")
    ax_sp.legend(fontsize=8)

    ss = report["spread_skill"]
    shells = np.asarray(ss["per_shell"], dtype=np.float64)
    freq = shells[:, 0] / float(report["voxel_size_A"])
    with np.errstate(invalid="ignore", divide="ignore"):
        for region, (col_s, col_e), colour in (("measured", (1, 2), "C0"),
                                               ("wedge", (3, 4), "C3")):
            ratio = np.sqrt(shells[:, col_s] / shells[:, col_e])
            good = np.isfinite(ratio)
            ax_ss.plot(freq[good], ratio[good], "o-", ms=3, color=colour,
                       label=f"{region} (all {ss[f'spread_skill_{region}']:.2f})")
    ax_ss.axhline(1.0, color="k", ls="--", lw=1)
    ax_ss.set(yscale="log", xlabel="spatial frequency (1/A)", ylabel="spread / skill",
              title=f"spread/skill per shell ({report['n_samples']} samples)")
    ax_ss.legend(fontsize=8)
    fig.suptitle(f"{Path(report['family']).name} vs {Path(report['gt']).name}: "
                 f"{report['truth']}", fontsize=9)
    return save_figure(fig, path, dpi=100)


__all__ = ["calibration_figure"]
