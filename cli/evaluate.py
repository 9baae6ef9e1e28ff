"""`cryowae evaluate`: score a restored tomogram, or calibrate a posterior family,
against its ground truth; without one, the ground-truth-free figures of a restoration."""

from __future__ import annotations

from pathlib import Path

import typer

from cryowae.cli.common import VOXEL_SIZE_OPTION


def _finite_or_none(value):
    """JSON has no inf/nan: write them as null."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def evaluate(
    ctx: typer.Context,
    restored: Path = typer.Argument(..., help="Restored tomogram (MRC or OME-Zarr), or a "
                                    "family directory from `cryowae sample`.",
                                    show_default=False),
    gt: Path | None = typer.Option(None, "--gt", help="Ground-truth tomogram, same shape "
                                   "(MRC or OME-Zarr); needed for a family. Without it: "
                                   "the ground-truth-free figures of RESTORED (and "
                                   "--tomogram).", show_default=False),
    tilt_min: float | None = typer.Option(None, "--tilt-min", help="Lowest tilt angle of "
                                          "the acquisition, degrees (defines the missing "
                                          "wedge)."),
    tilt_max: float | None = typer.Option(None, "--tilt-max", help="Highest tilt angle, "
                                          "degrees."),
    tilt_axis: str | None = typer.Option(None, "--tilt-axis", help="Tilt axis: y or x "
                                         "[default: y]."),
    tilt_file: Path | None = typer.Option(None, "--tilt-file", help="Tilt angles "
                                          "(.tlt/.rawtlt). Without it or --tilt-min/"
                                          "--tilt-max, a tilt file next to RESTORED, then "
                                          "next to --gt (without --gt: --tomogram) "
                                          "(<stem>.tlt, <stem>.rawtlt, tilts.tlt), else "
                                          "-60..60 with a warning."),
    voxel_size: float | None = VOXEL_SIZE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout "
                                 "and nothing else."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as JSON here."),
    single: Path | None = typer.Option(None, "--restored", help="Family only: the single "
                                       "restoration, for CRPS against its MAE."),
    even: Path | None = typer.Option(None, "--even", help="Family (sampled from this even "
                                     "half): halves check against --odd. Without --gt: "
                                     "an even half (raw or restored) for the half-to-half "
                                     "FSC."),
    odd: Path | None = typer.Option(None, "--odd", help="The odd half (with --even)."),
    tomogram: Path | None = typer.Option(None, "--tomogram", help="Family: the sampled "
                                         "tomogram (intensity scale of the truth); default: "
                                         "the one family.json names. Without --gt: the raw "
                                         "tomogram RESTORED came from (scored beside it; "
                                         "its signal band and empty regions are used)."),
    sim_meta: Path | None = typer.Option(None, "--sim-meta", help="Family only: the "
                                         "simulation's meta.json (CTF); default: "
                                         "meta.json beside --gt."),
    ctf: str | None = typer.Option(None, "--ctf", help="Family only: the truth's CTF. "
                                   "auto: filtered by |CTF| when a meta.json from `cryowae "
                                   "simulate` names it (another program's meta.json is "
                                   "ignored with a note), else raw; none: raw; abs: "
                                   "|CTF| (needs that meta.json) [default: auto]."),
    png: Path | None = typer.Option(None, "--png", help="Family only: write the figure "
                                    "here (reliability diagram, sparsification curves, "
                                    "spread/skill per shell); with --out, it is also "
                                    "written beside the JSON (same name, .png)."),
    points: Path | None = typer.Option(None, "--points", help="Without --gt: annotated "
                                       "surface points, .npy (N, 3) z, y, x."),
    normals: Path | None = typer.Option(None, "--normals", help="Without --gt: their "
                                        "normals, .npy (N, 2, 3) [position, unit normal] "
                                        "or (N, 3) with --points: visibility of "
                                        "beam-facing against side-facing patches."),
    annotation_scale: float | None = typer.Option(None, "--annotation-scale", help="Factor "
                                                  "from annotation to voxel coordinates "
                                                  "(0.25 for an annotation 4x finer than "
                                                  "the tomogram) [default: 1]."),
) -> None:
    """Compare RESTORED with --gt: Pearson correlation, PSNR (on normalised volumes), FSC
    resolution at 0.143 and 0.5, and Fourier correlation in the measured and in the
    missing-wedge region.

    For a family directory (from `cryowae sample`), against the truth on the samples'
    intensity scale (affine fit; |CTF|-filtered per --ctf), a table of: spread/skill
    overall, measured and wedge region (1 = calibrated); the fraction of voxels whose
    truth lies outside [min, max] of the S samples (ideal 2/(S+1)); the coverage of the
    50% and 90% Gaussian intervals after a 30 A low-pass, and of the wedge component;
    the ENCE over 10 std-quantile bins (0 = calibrated); the sparsification gain of the
    std map and of two restoration-only maps (1 = oracle, 0 = random order); the fair
    CRPS beside the MAE of the family mean and of --restored; the family mean's Pearson
    and wedge CC; with --even/--odd, the halves check. --json / --out hold the per-shell
    and per-bin values and the curves.

    Without --gt: how much of the missing wedge is filled, streak power along the wedge
    edges in empty regions, with --points/--normals the visibility of beam-facing
    patches, with --even/--odd the half-to-half FSC; for RESTORED and --tomogram."""
    import json
    import sys

    from cryowae.cli.common import use_voxel_size
    from cryowae.errors import CryowaeInputError
    from cryowae.io import read_volume
    from cryowae.physics.geometry import TiltGeometry, find_tilt_file

    # the ground truth's voxel size is the one used; without it the raw tomogram's
    use_voxel_size(ctx, voxel_size, *[p for p in (gt if gt is not None else tomogram,)
                                       if p is not None])
    is_family = (restored / "family.json").is_file()
    if gt is None and not is_family:
        from cryowae.cli.evaluate_gtfree import evaluate_without_truth_cli

        evaluate_without_truth_cli(
            restored, tomogram=tomogram, even=even, odd=odd, points=points,
            normals=normals, annotation_scale=annotation_scale, tilt_min=tilt_min,
            tilt_max=tilt_max, tilt_axis=tilt_axis, tilt_file=tilt_file,
            voxel_size=voxel_size, as_json=as_json, out=out,
            family_only={"--restored": single, "--sim-meta": sim_meta, "--ctf": ctf,
                         "--png": png})
        return
    if gt is None:
        raise CryowaeInputError("a family directory is evaluated against its ground truth: "
                                "give --gt")
    if any(v is not None for v in (points, normals, annotation_scale)):
        raise CryowaeInputError("--points, --normals and --annotation-scale are for an "
                                "evaluation without --gt")
    if is_family:
        _evaluate_family(restored, gt, tilt_min, tilt_max, tilt_axis, tilt_file,
                         voxel_size, as_json, out, single, even, odd, tomogram, sim_meta,
                         ctf, png)
        return
    if any(v is not None for v in (single, even, odd, tomogram, sim_meta, ctf, png)):
        raise CryowaeInputError("--restored, --even, --odd, --tomogram, --sim-meta, --ctf "
                                "and --png are for a family directory (from `cryowae "
                                "sample`)")

    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=tilt_axis, tomogram=restored)
    near_gt = find_tilt_file(gt) if geometry.source == "default" else None
    if near_gt is not None:
        geometry = TiltGeometry.from_file(near_gt, geometry.axis)
    if voxel_size is not None and not voxel_size > 0:
        raise CryowaeInputError(f"--voxel-size must be positive, got {voxel_size:g}")
    rvol = read_volume(restored, check_nan=True)
    gvol = read_volume(gt, check_nan=True)
    if rvol.shape != gvol.shape:
        raise CryowaeInputError(
            f"{restored} and {gt} differ in shape: {rvol.shape} vs {gvol.shape} (Z, Y, X)")
    vs = float(voxel_size) if voxel_size is not None else float(gvol.voxel_size)
    warnings: list[str] = []
    if geometry.source == "default":
        warnings.append(f"no tilt range given and no tilt file found next to {restored.name} "
                        f"or {gt.name}; assuming -60..60 degrees (set --tilt-min/--tilt-max "
                        "or --tilt-file)")
    if voxel_size is None and abs(rvol.voxel_size - gvol.voxel_size) > 1e-3 * vs:
        warnings.append(f"voxel sizes differ ({rvol.voxel_size:g} A in {restored.name}, "
                        f"{gvol.voxel_size:g} A in {gt.name}); using the ground truth's "
                        f"{vs:g} A")

    from cryowae.metrics.report import evaluate_volumes

    report = evaluate_volumes(rvol.numpy(), gvol.numpy(), vs, geometry)
    report = {**{k: v for k, v in report.items() if k != "fsc"},
              "restored": str(restored), "gt": str(gt), "fsc": report["fsc"]}
    if warnings:
        report["warnings"] = warnings
    text = json.dumps(_finite_or_none(report), allow_nan=False)
    if out is not None:
        from cryowae.io import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(_finite_or_none(report), indent=2, allow_nan=False)
                           + "\n", encoding="utf-8")
    for w in warnings:
        print(f"cryowae: warning: {w}", file=sys.stderr)
    if as_json:
        sys.stdout.write(text + "\n")
        return
    _print_table(report, out)


def _evaluate_family(family: Path, gt: Path, tilt_min: float | None,
                     tilt_max: float | None, tilt_axis: str | None, tilt_file: Path | None,
                     voxel_size: float | None, as_json: bool, out: Path | None,
                     single: Path | None, even: Path | None, odd: Path | None,
                     tomogram: Path | None, sim_meta: Path | None, ctf: str | None,
                     png: Path | None) -> None:
    import json
    import sys

    from cryowae.errors import CryowaeInputError
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import evaluate_family

    if voxel_size is not None and not voxel_size > 0:
        raise CryowaeInputError(f"--voxel-size must be positive, got {voxel_size:g}")
    meta = json.loads((family / "family.json").read_text())
    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=tilt_axis,
                                    fallback=TiltGeometry.from_dict(meta["geometry"]))
    report = evaluate_family(family, gt, restored=single, geometry=geometry,
                             voxel_size=voxel_size, tomogram=tomogram, sim_meta=sim_meta,
                             even=even, odd=odd, ctf=ctf or "auto")
    pngs = [p for p in (png, out.with_suffix(".png") if out is not None else None)
            if p is not None]
    if pngs:
        from cryowae.metrics.calibration_figure import calibration_figure

        for p in dict.fromkeys(pngs):
            calibration_figure(report, p)
    text = json.dumps(_finite_or_none(report), allow_nan=False)
    if out is not None:
        from cryowae.io import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(_finite_or_none(report), indent=2, allow_nan=False)
                           + "\n", encoding="utf-8")
    for w in report.get("warnings", []):
        print(f"cryowae: note: {w}", file=sys.stderr)
    if as_json:
        sys.stdout.write(text + "\n")
        return
    _print_family_table(report)
    for p in [*dict.fromkeys(pngs), *([out] if out is not None else [])]:
        print(f"written: {p}")


def _print_family_table(report: dict) -> None:
    """The family's calibration figures: value, what a calibrated family reads, meaning."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    ss, rng, cov = report["spread_skill"], report["outside_range"], report["coverage"]
    rel, sp, crps = report["reliability"], report["sparsification"], report["crps"]
    low = f"{cov['lowpass_A']:g} A low-pass"
    rows = [
        ("spread/skill", f"{ss['spread_skill']:.3f}", "1", "all Fourier coefficients"),
        ("spread/skill measured", f"{ss['spread_skill_measured']:.3f}", "1",
         "measured region"),
        ("spread/skill wedge", f"{ss['spread_skill_wedge']:.3f}", "1", "missing wedge"),
        ("outside [min, max]", f"{rng['fraction']:.4f}", f"{rng['ideal']:.4f}",
         f"truth outside the samples' range, 2/(S+1) ideal "
         f"({rng['fraction_lowpass']:.4f} after {low})"),
        ("coverage 50%", f"{cov['all_50']:.3f}", "0.5", f"Gaussian interval, {low}"),
        ("coverage 90%", f"{cov['all_90']:.3f}", "0.9", f"Gaussian interval, {low}"),
        ("coverage wedge 50/90%", f"{cov['wedge_50']:.3f}/{cov['wedge_90']:.3f}",
         "0.5/0.9", "wedge component"),
        ("ENCE", f"{rel['ence']:.3f}", "0", f"|RMV - RMSE| / RMV, {rel['n_bins']} std bins"),
        ("sparsification gain, std", f"{sp['std']['gain']:.3f}", "1",
         "1 = oracle order, 0 = random"),
        ("  local magnitude", f"{sp['local_magnitude']['gain']:.3f}", "",
         f"map of the {sp['restoration_maps_from']} alone"),
        ("  local deviation", f"{sp['local_deviation']['gain']:.3f}", "",
         f"map of the {sp['restoration_maps_from']} alone"),
        ("  local detail power", f"{sp['local_detail_power']['gain']:.3f}", "",
         f"map of the {sp['restoration_maps_from']} alone"),
        ("CRPS family", f"{crps['crps_family']:.4g}", "low", "fair ensemble CRPS"),
        ("MAE family mean", f"{crps['mae_family_mean']:.4g}", "", ""),
    ]
    if "mae_single" in crps:
        rows.append(("MAE single", f"{crps['mae_single']:.4g}", "> CRPS",
                     "--restored (its CRPS)"))
    fm = report["family_mean"]
    rows.append(("Pearson family mean", f"{fm['pearson']:.4f}", "",
                 f"raw ground truth; wedge CC {fm['cc_wedge']:.4f}"))
    if "halves_check" in report:
        rows.append(("halves check", f"{report['halves_check']['ratio_median']:.3f}", "1",
                     "gap to the odd half, observed / predicted"))
    t = Table(title=escape(f"{report['family']} vs {report['gt']}: {report['n_samples']} "
                           f"samples, {report['truth']}"))
    for col, just in (("metric", "left"), ("value", "right"), ("ideal", "right"),
                      ("meaning", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in rows:
        t.add_row(*(escape(c) for c in row))
    Console().print(t)


def _print_table(report: dict, out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(v: float | None, fmt: str) -> str:
        return "n/a" if v is None or v != v else (format(v, fmt) if abs(v) != float("inf")
                                                  else "inf")

    nyq = report["nyquist_A"]
    t = Table(title=f"{Path(report['restored']).name} vs {Path(report['gt']).name}  "
              f"({' x '.join(map(str, report['shape']))} voxels, {report['voxel_size_A']:g} A, "
              f"tilts {report['tilt_min']:g}..{report['tilt_max']:g} deg about "
              f"{report['tilt_axis'].upper()}, {report['tilt_source']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    t.add_row("Pearson", num(report["pearson"], ".4f"), "real-space correlation, all voxels")
    t.add_row("PSNR", num(report["psnr_db"], ".2f") + " dB",
              "normalised volumes; peak = range of the ground truth")
    for key, thr in (("fsc_0143_A", "0.143"), ("fsc_05_A", "0.5")):
        v = report[key]
        note = " (Nyquist: never crossed)" if v is not None and abs(v - nyq) < 1e-9 else ""
        t.add_row(f"FSC {thr}", num(v, ".1f") + " A", f"resolution at FSC = {thr}{note}")
    t.add_row("CC measured", num(report["cc_measured"], ".4f"),
              "Fourier correlation, measured region")
    t.add_row("CC wedge", num(report["cc_wedge"], ".4f"),
              "Fourier correlation, missing wedge")
    t.add_row("wedge power", num(report.get("wedge_power_ratio"), ".3f"),
              "restored / ground-truth power in the wedge")
    console = Console()
    console.print(t)
    if out is not None:
        console.print(f"report written to {out}")


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
