"""Calibration figures of a family directory (`cryowae evaluate FAMILY_DIR --gt GT`).

Reads the family (``samples.zarr``, ``family.json``) and the ground truth into memory
(an evaluation of simulated data; sampling itself is bounded) and reports, with the
conventions of `cryowae.metrics.calibration`:

- **the truth the data can show**: the ground truth filtered by |CTF(|k|)|
  (`truth_seen_by_data`, mode ``abs_ctf``) when the simulation's ``meta.json`` (beside
  the ground truth, or given) has the CTF on; the raw truth otherwise. It is put on
  the samples' intensity scale by least squares of the sampled tomogram on it over the
  measured Fourier region without DC (the data's noise is independent of the truth, so
  the fit is unbiased), plus the mean offset;
- spread/skill (S/(S+1) corrected) overall, in the measured and the wedge region and
  per shell;
- coverage of the 50% and 90% central intervals over all voxels after a low-pass at
  `LOWPASS_A` (a sharp spherical cut at voxel_size / 30 A cycles per voxel, none when
  that is beyond Nyquist), and of the wedge component (unfiltered); the intervals are
  the Gaussian prediction intervals of `interval_coverage` (Student t, S - 1 degrees
  of freedom), which a calibrated family fills to their level whatever S;
- the fair CRPS of the family against the single restoration's mean absolute error
  (with `restored`);
- the family mean's Pearson correlation and wedge CC to the raw ground truth
  (`evaluate_volumes`, as ``cryowae evaluate TOMO --gt GT``);
- with even/odd halves, the halves check per shell (`halves_check`): for a family
  sampled from the EVEN half, does its spread plus the odd half's noise predict how far
  its mean lies from the odd half (ratio about 1)?
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.geometry import TiltGeometry

#: low-pass (Angstrom) before the all-voxel coverage
LOWPASS_A = 30.0
_DIMS = (-3, -2, -1)


def _lowpass(v: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Keep |k| <= cutoff (cycles per voxel) of the last three axes."""
    from cryowae.physics.fourier import radial_frequency

    if cutoff >= 0.5:
        return v
    r = radial_frequency(tuple(v.shape[-3:]), rfft=True)  # type: ignore[arg-type]
    spec = torch.fft.rfftn(v, dim=_DIMS) * (r <= cutoff)
    return torch.fft.irfftn(spec, s=tuple(v.shape[-3:]), dim=_DIMS)


def truth_on_data_scale(truth: torch.Tensor, data: torch.Tensor,
                        geometry: TiltGeometry) -> tuple[torch.Tensor, float, float]:
    """``a truth + b`` fitted to `data` over the measured region (module docstring)."""
    from cryowae.metrics.calibration import SpectralGrid

    grid = SpectralGrid.of(truth.shape, geometry)
    ft = torch.fft.rfftn(truth.double(), dim=_DIMS)
    fd = torch.fft.rfftn(data.double(), dim=_DIMS)
    w = grid.mult.double() * grid.measured
    den = float((w * ft.abs().square()).sum())
    if den <= 0:
        raise CryowaeInputError("the ground truth has no power in the measured region")
    a = float((w * (ft.conj() * fd).real).sum()) / den
    b = float(data.double().mean() - a * truth.double().mean())
    return (a * truth.double() + b).float(), a, b


def _ctf_of(gt: Path, sim_meta: Path | None) -> tuple[Any, str]:
    from cryowae.metrics.calibration_checks import ctf_params_from_meta

    meta_path = sim_meta if sim_meta is not None else gt.parent / "meta.json"
    if not meta_path.is_file():
        if sim_meta is not None:
            raise CryowaeInputError(f"{sim_meta}: no such file")
        return None, "raw ground truth (no meta.json beside it: CTF not known)"
    params = ctf_params_from_meta(json.loads(meta_path.read_text()))
    if params is None:
        return None, f"raw ground truth (CTF off in {meta_path.name})"
    return params, f"ground truth filtered by |CTF| ({meta_path})"


def _median(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def evaluate_family(family: str | os.PathLike, gt: str | os.PathLike,
                    restored: str | os.PathLike | None = None,
                    geometry: TiltGeometry | None = None,
                    voxel_size: float | None = None,
                    tomogram: str | os.PathLike | None = None,
                    sim_meta: str | os.PathLike | None = None,
                    even: str | os.PathLike | None = None,
                    odd: str | os.PathLike | None = None) -> dict[str, Any]:
    """Calibration report of a family directory against the ground truth (module
    docstring). `geometry` defaults to the family's, `tomogram` (the sampled data, for
    the intensity scale) to the one ``family.json`` names, `voxel_size` to the ground
    truth's header."""
    import zarr

    from cryowae.io import read_volume
    from cryowae.metrics.calibration import (
        crps_report,
        interval_coverage,
        spread_skill,
        wedge_coverage,
    )
    from cryowae.metrics.calibration_checks import halves_check, truth_seen_by_data
    from cryowae.metrics.report import evaluate_volumes
    from cryowae.training.noise import noise_from_halves

    fam = Path(family)
    if not (fam / "family.json").is_file():
        raise CryowaeInputError(f"{fam}: not a family directory (no family.json)")
    meta = json.loads((fam / "family.json").read_text())
    geo = geometry or TiltGeometry.from_dict(meta["geometry"])
    samples = torch.from_numpy(np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"),
                                                          mode="r")[:], dtype=np.float32))
    with read_volume(gt) as gvol:
        g = torch.from_numpy(gvol.numpy().astype(np.float32))
        vs = float(voxel_size) if voxel_size is not None else float(gvol.voxel_size)
    if tuple(g.shape) != tuple(samples.shape[1:]):
        raise CryowaeInputError(f"{gt}: shape {tuple(g.shape)} differs from the family's "
                                f"{tuple(samples.shape[1:])}")
    tomo = Path(tomogram) if tomogram is not None else Path(meta["tomogram"])
    if not tomo.is_file() and not tomo.is_dir():
        raise CryowaeInputError(f"{tomo}: the sampled tomogram is needed for the intensity "
                                "scale (give --tomogram)")
    with read_volume(tomo) as tvol:
        d = torch.from_numpy(tvol.numpy().astype(np.float32))
    params, truth_note = _ctf_of(Path(gt), Path(sim_meta) if sim_meta else None)
    seen = truth_seen_by_data(g, vs, params, "abs_ctf")
    truth, a, b = truth_on_data_scale(seen, d, geo)
    s_count = int(samples.shape[0])
    ss = spread_skill(samples, truth, geo)
    cut = vs / LOWPASS_A
    cov = interval_coverage(_lowpass(samples, cut), _lowpass(truth, cut))
    wcov = wedge_coverage(samples, truth, geo)
    mean = samples.mean(dim=0)
    fam_scores = evaluate_volumes(mean, g, vs, geo)
    report: dict[str, Any] = {
        "family": str(fam), "gt": str(gt), "n_samples": s_count, "voxel_size_A": vs,
        "geometry": geo.to_dict(), "truth": truth_note,
        "truth_scale": {"a": a, "b": b, "fitted_on": str(tomo)},
        "spread_skill": ss.to_dict(),
        "coverage": {"lowpass_A": LOWPASS_A, "all_50": cov[0.5], "all_90": cov[0.9],
                     "wedge_50": wcov[0.5], "wedge_90": wcov[0.9],
                     "interval": "Gaussian prediction interval mean +- t s sqrt(1 + 1/S) "
                                 "(covers its level for a calibrated family at any S)",
                     "expected_50": 0.5, "expected_90": 0.9},
        "family_mean": {"pearson": fam_scores["pearson"], "cc_wedge": fam_scores["cc_wedge"],
                        "cc_measured": fam_scores["cc_measured"]},
    }
    if restored is not None:
        with read_volume(restored) as rvol:
            r = torch.from_numpy(rvol.numpy().astype(np.float32))
        if tuple(r.shape) != tuple(g.shape):
            raise CryowaeInputError(f"{restored}: shape {tuple(r.shape)} differs from the "
                                    f"ground truth's {tuple(g.shape)}")
        report["crps"] = crps_report(samples, truth, r)
        single = evaluate_volumes(r, g, vs, geo)
        report["single"] = {"pearson": single["pearson"], "cc_wedge": single["cc_wedge"],
                            "cc_measured": single["cc_measured"]}
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    if even is not None and odd is not None:
        with read_volume(even) as ev, read_volume(odd) as od:
            e = torch.from_numpy(ev.numpy().astype(np.float32))
            o = torch.from_numpy(od.numpy().astype(np.float32))
        if tuple(e.shape) != tuple(g.shape) or tuple(o.shape) != tuple(g.shape):
            raise CryowaeInputError("--even/--odd must have the family's shape")
        noise = noise_from_halves(e, o, geo).half
        hc = halves_check(samples, o, noise.power, geo)
        report["halves_check"] = {
            "note": "family sampled from the even half against the odd half",
            "ratio_median": _median(hc["ratio"]),
            "per_shell": [[float(f), float(x), float(y), float(z)] for f, x, y, z in zip(
                hc["frequency"], hc["observed"], hc["predicted"], hc["ratio"],
                strict=True)],
            "per_shell_columns": ["frequency", "observed", "predicted", "ratio"]}
    return report


def calibration_line(report: dict[str, Any]) -> str:
    """One line of the main calibration figures."""
    ss, cov, fm = report["spread_skill"], report["coverage"], report["family_mean"]
    line = (f"spread/skill {ss['spread_skill']:.2f} (measured "
            f"{ss['spread_skill_measured']:.2f}, wedge {ss['spread_skill_wedge']:.2f}); "
            f"coverage 90% {cov['all_90']:.2f} (after {cov['lowpass_A']:g} A low-pass), "
            f"wedge 90% {cov['wedge_90']:.2f}; "
            f"family mean Pearson {fm['pearson']:.3f}, wedge CC {fm['cc_wedge']:.3f}")
    if "crps" in report:
        line += (f"; CRPS {report['crps']['crps_family']:.4g} vs single MAE "
                 f"{report['crps']['mae_single']:.4g}")
    return line


__all__ = ["LOWPASS_A", "calibration_line", "evaluate_family", "truth_on_data_scale"]
