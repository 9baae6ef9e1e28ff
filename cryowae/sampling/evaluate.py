"""Calibration figures of a family directory (`cryowae evaluate FAMILY_DIR --gt GT`).

Reads the family (``samples.zarr``, ``family.json``) and the ground truth into memory
(an evaluation of simulated data; sampling itself is bounded) and reports, with the
conventions of `cryowae.metrics.calibration`, `cryowae.metrics.uncertainty` and
`cryowae.metrics.sparsification`:

- **the truth the data can show** (`truth_ctf`, `CTF_MODES`): under ``auto`` the ground
  truth filtered by |CTF(|k|)| (`truth_seen_by_data`, mode ``abs_ctf``) when a
  meta.json cryowae understands (beside the ground truth, or given) has the CTF on, the
  raw truth otherwise (another program's meta.json is ignored with one warning line).
  It is put on the samples' intensity scale by least squares of the sampled tomogram
  on it over the measured Fourier region without DC (the data's noise is independent
  of the truth, so the fit is unbiased), plus the mean offset (`truth_on_data_scale`).
  Every error below is of that fitted truth;
- spread/skill (S/(S+1) corrected) overall, in the measured and the wedge region and
  per shell;
- the fraction of voxels whose truth lies outside [min, max] of the S samples (ideal
  2 / (S + 1)), raw and after the low-pass below;
- coverage of the 50% and 90% central intervals over all voxels after a low-pass at
  `LOWPASS_A` (a sharp spherical cut at voxel_size / 30 A cycles per voxel, none when
  that is beyond Nyquist), and of the wedge component (unfiltered); the intervals are
  the Gaussian prediction intervals of `interval_coverage` (Student t, S - 1 degrees
  of freedom), which a calibrated family fills to their level whatever S;
- the ENCE over `ENCE_BINS` std-quantile bins of the family's predicted std
  (std sqrt((S + 1) / S)) against the family mean's error, and the bins (reliability
  diagram);
- sparsification curves of the error of the family mean: ordered by the std map, by
  the oracle |error|, and by three maps of the restoration alone (`--restored`, else
  the family mean: its local magnitude, local deviation and local detail power,
  Gaussian of `DETAIL_SIGMA_VOXELS`), with their gains (1 = oracle, 0 = random order);
- the fair CRPS of the family beside the mean absolute error of the family mean and,
  with `restored`, of the single restoration;
- the family mean's Pearson correlation and wedge CC to the raw ground truth
  (`evaluate_volumes`, as ``cryowae evaluate TOMO --gt GT``);
- with even/odd halves, the halves check per shell (`halves_check`): for a family
  sampled from the EVEN half, does its spread plus the odd half's noise predict how far
  its mean lies from the odd half (ratio about 1)?
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.physics.ctf import CTFParams
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


#: how the ground truth's CTF is treated: ``auto`` filters by |CTF| when a meta.json
#: that cryowae understands (a `cryowae simulate` output) names the CTF, else uses the
#: raw truth; ``none`` always the raw truth; ``abs`` always |CTF| (a meta.json needed)
CTF_MODES = ("auto", "none", "abs")


@dataclass(frozen=True)
class TruthCTF:
    """The CTF applied to the ground truth: `params` (None: raw truth), `note` (what
    truth the report uses), `warning` (one line for stderr, e.g. a meta.json ignored)."""

    params: CTFParams | None
    note: str
    warning: str | None = None


def truth_ctf(gt: str | os.PathLike, sim_meta: str | os.PathLike | None = None,
              mode: str = "auto") -> TruthCTF:
    """The CTF of the ground truth `gt` under `mode` (`CTF_MODES`), read from
    `sim_meta` or from ``meta.json`` beside `gt`. A meta.json found beside `gt` that
    cryowae does not understand is ignored under ``auto`` (with a warning line); one
    given as `sim_meta`, or any under ``abs``, must be understood."""
    from cryowae.metrics.calibration_checks import ctf_params_from_meta

    if mode not in CTF_MODES:
        raise CryowaeInputError(f"unknown CTF mode {mode!r}: use {', '.join(CTF_MODES)}")
    if mode == "none":
        return TruthCTF(None, "raw ground truth (--ctf none)")
    path = Path(sim_meta) if sim_meta is not None else Path(gt).parent / "meta.json"
    if not path.is_file():
        if sim_meta is not None:
            raise CryowaeInputError(f"{sim_meta}: no such file")
        if mode == "abs":
            raise CryowaeInputError(f"--ctf abs needs the simulation's meta.json (none "
                                    f"beside {Path(gt).name}; give --sim-meta)")
        return TruthCTF(None, "raw ground truth (no meta.json beside it: CTF not known)")
    try:
        params = ctf_params_from_meta(json.loads(path.read_text(encoding="utf-8")))
    except (CryowaeInputError, ValueError, UnicodeDecodeError) as exc:
        reason = str(exc) if isinstance(exc, CryowaeInputError) else "not valid JSON"
        if sim_meta is not None or mode == "abs":
            raise CryowaeInputError(f"{path}: not a cryowae simulation's meta.json "
                                    f"({reason})") from None
        return TruthCTF(None, f"raw ground truth ({path.name} beside it ignored)",
                        f"{path}: not a cryowae simulation's meta.json ({reason}); "
                        "ignored, the raw ground truth is used (--ctf none to say so)")
    if params is None:
        if mode == "abs":
            raise CryowaeInputError(f"--ctf abs: {path} says the simulation had no CTF")
        return TruthCTF(None, f"raw ground truth (CTF off in {path.name})")
    return TruthCTF(params, f"ground truth filtered by |CTF| ({path})")


def _median(v: np.ndarray) -> float:
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def _read(path: str | os.PathLike, what: str, shape: tuple[int, ...] | None = None
          ) -> tuple[torch.Tensor, float]:
    from cryowae.io import read_volume

    with read_volume(path, check_nan=True) as vol:
        v = torch.from_numpy(vol.numpy().astype(np.float32))
        vs = float(vol.voxel_size)
    if shape is not None and tuple(v.shape) != shape:
        raise CryowaeInputError(f"{path}: shape {tuple(v.shape)} differs from the "
                                f"family's {shape} ({what})")
    return v, vs


def evaluate_family(family: str | os.PathLike, gt: str | os.PathLike,
                    restored: str | os.PathLike | None = None,
                    geometry: TiltGeometry | None = None,
                    voxel_size: float | None = None,
                    tomogram: str | os.PathLike | None = None,
                    sim_meta: str | os.PathLike | None = None,
                    even: str | os.PathLike | None = None,
                    odd: str | os.PathLike | None = None,
                    ctf: str = "auto") -> dict[str, Any]:
    """Calibration report of a family directory against the ground truth (module
    docstring). `geometry` defaults to the family's, `tomogram` (the sampled data, for
    the intensity scale) to the one ``family.json`` names, `voxel_size` to the ground
    truth's header, `ctf` is one of `CTF_MODES`. Lines for stderr (a meta.json
    ignored) are in ``report["warnings"]``."""
    import zarr

    from cryowae.metrics.calibration import (
        crps_report,
        interval_coverage,
        spread_skill,
        wedge_coverage,
    )
    from cryowae.metrics.calibration_checks import halves_check, truth_seen_by_data
    from cryowae.metrics.report import evaluate_volumes
    from cryowae.metrics.uncertainty import (
        ENCE_BINS,
        family_mean_std,
        outside_range_fraction,
        predicted_std,
        reliability,
    )
    from cryowae.training.noise import noise_from_halves

    fam = Path(family)
    if not (fam / "family.json").is_file():
        raise CryowaeInputError(f"{fam}: not a family directory (no family.json)")
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    if voxel_size is not None and not voxel_size > 0:
        raise CryowaeInputError(f"voxel size must be positive, got {voxel_size:g}")
    tc = truth_ctf(gt, sim_meta, ctf)
    meta = json.loads((fam / "family.json").read_text())
    geo = geometry or TiltGeometry.from_dict(meta["geometry"])
    samples = torch.from_numpy(np.asarray(zarr.open_array(str(fam / "samples.zarr" / "0"),
                                                          mode="r")[:], dtype=np.float32))
    shape = tuple(int(v) for v in samples.shape[1:])
    g, gt_vs = _read(gt, "ground truth", shape)
    vs = float(voxel_size) if voxel_size is not None else gt_vs
    tomo = Path(tomogram) if tomogram is not None else Path(meta["tomogram"])
    if not tomo.is_file() and not tomo.is_dir():
        raise CryowaeInputError(f"{tomo}: the sampled tomogram is needed for the intensity "
                                "scale (give --tomogram)")
    d, _ = _read(tomo, "sampled tomogram", shape)
    r = _read(restored, "restoration", shape)[0] if restored is not None else None
    truth, a, b = truth_on_data_scale(truth_seen_by_data(g, vs, tc.params, "abs_ctf"), d, geo)
    s_count = int(samples.shape[0])
    ss = spread_skill(samples, truth, geo)
    cut = vs / LOWPASS_A
    low_samples, low_truth = _lowpass(samples, cut), _lowpass(truth, cut)
    cov = interval_coverage(low_samples, low_truth)
    wcov = wedge_coverage(samples, truth, geo)
    rng = outside_range_fraction(samples, truth)
    mean, std = family_mean_std(samples)
    error = mean - truth
    pred = predicted_std(std, s_count)
    fam_scores = evaluate_volumes(mean, g, vs, geo)
    report: dict[str, Any] = {
        "family": str(fam), "gt": str(gt), "n_samples": s_count, "voxel_size_A": vs,
        "geometry": geo.to_dict(), "truth": tc.note, "ctf_mode": ctf,
        "truth_scale": {"a": a, "b": b, "fitted_on": str(tomo)},
        "spread_skill": ss.to_dict(),
        "outside_range": {**rng, "fraction_lowpass": outside_range_fraction(
            low_samples, low_truth)["fraction"], "lowpass_A": LOWPASS_A},
        "coverage": {"lowpass_A": LOWPASS_A, "all_50": cov[0.5], "all_90": cov[0.9],
                     "wedge_50": wcov[0.5], "wedge_90": wcov[0.9],
                     "interval": "Gaussian prediction interval mean +- t s sqrt(1 + 1/S) "
                                 "(covers its level for a calibrated family at any S)",
                     "expected_50": 0.5, "expected_90": 0.9},
        "reliability": {**reliability(pred, error, ENCE_BINS).to_dict(),
                        "predicted_std": "family std * sqrt((S + 1) / S)",
                        "error": "family mean - truth"},
        "sparsification": _sparsification(pred, error, r if r is not None else mean,
                                          "restored" if r is not None else "family mean"),
        "crps": crps_report(samples, truth, r),
        "family_mean": {"pearson": fam_scores["pearson"], "cc_wedge": fam_scores["cc_wedge"],
                        "cc_measured": fam_scores["cc_measured"]},
    }
    if tc.warning:
        report["warnings"] = [tc.warning]
    if r is not None:
        single = evaluate_volumes(r, g, vs, geo)
        report["single"] = {"pearson": single["pearson"], "cc_wedge": single["cc_wedge"],
                            "cc_measured": single["cc_measured"]}
    if even is not None and odd is not None:
        e, o = _read(even, "--even", shape)[0], _read(odd, "--odd", shape)[0]
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


def _sparsification(pred: torch.Tensor, error: torch.Tensor, restoration: torch.Tensor,
                    source: str) -> dict[str, Any]:
    """Sparsification curves of the family mean's error by the std map and by the three
    restoration-only maps (module docstring)."""
    from cryowae.metrics.sparsification import (
        DETAIL_SIGMA_VOXELS,
        local_detail_power_map,
        local_deviation_map,
        local_magnitude_map,
        sparsification,
    )

    maps = {"std": pred, "local_magnitude": local_magnitude_map(restoration),
            "local_deviation": local_deviation_map(restoration),
            "local_detail_power": local_detail_power_map(restoration)}
    return {"error": "family mean - truth", "restoration_maps_from": source,
            "smoothing_sigma_voxels": DETAIL_SIGMA_VOXELS,
            "gain": "1 = ordered as the oracle |error|, 0 = random order",
            **{k: sparsification(v, error).to_dict() for k, v in maps.items()}}


def calibration_line(report: dict[str, Any]) -> str:
    """One line of the main calibration figures."""
    ss, cov, fm = report["spread_skill"], report["coverage"], report["family_mean"]
    rng, sp = report["outside_range"], report["sparsification"]
    line = (f"spread/skill {ss['spread_skill']:.2f} (measured "
            f"{ss['spread_skill_measured']:.2f}, wedge {ss['spread_skill_wedge']:.2f}); "
            f"outside range {rng['fraction']:.3f} (ideal {rng['ideal']:.3f}); "
            f"coverage 50/90% {cov['all_50']:.2f}/{cov['all_90']:.2f} (after "
            f"{cov['lowpass_A']:g} A low-pass), wedge 90% {cov['wedge_90']:.2f}; "
            f"ENCE {report['reliability']['ence']:.2f}; sparsification gain "
            f"{sp['std']['gain']:.2f}; CRPS {report['crps']['crps_family']:.4g}; "
            f"family mean Pearson {fm['pearson']:.3f}, wedge CC {fm['cc_wedge']:.3f}")
    if "mae_single" in report["crps"]:
        line += f"; single MAE {report['crps']['mae_single']:.4g}"
    return line


__all__ = ["CTF_MODES", "LOWPASS_A", "TruthCTF", "calibration_line", "evaluate_family",
           "truth_ctf", "truth_on_data_scale"]
