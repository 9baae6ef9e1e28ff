"""`cryowae evaluate`: score a restored tomogram, or calibrate a posterior family,
against its ground truth."""

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
    gt: Path = typer.Option(..., "--gt", help="Ground-truth tomogram, same shape (MRC or "
                            "OME-Zarr).", show_default=False),
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
                                          "next to --gt (<stem>.tlt, <stem>.rawtlt, "
                                          "tilts.tlt), else -60..60 with a warning."),
    voxel_size: float | None = VOXEL_SIZE_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout "
                                 "and nothing else."),
    out: Path | None = typer.Option(None, "--out", help="Also write the report as JSON here."),
    single: Path | None = typer.Option(None, "--restored", help="Family only: the single "
                                       "restoration, for CRPS against its MAE."),
    even: Path | None = typer.Option(None, "--even", help="Family only (sampled from this "
                                     "even half): halves check against --odd."),
    odd: Path | None = typer.Option(None, "--odd", help="Family only: the odd half."),
    tomogram: Path | None = typer.Option(None, "--tomogram", help="Family only: the sampled "
                                         "tomogram (intensity scale of the truth); default: "
                                         "the one family.json names."),
    sim_meta: Path | None = typer.Option(None, "--sim-meta", help="Family only: the "
                                         "simulation's meta.json (CTF); default: "
                                         "meta.json beside --gt."),
) -> None:
    """Compare RESTORED with --gt: Pearson correlation, PSNR (on normalised volumes), FSC
    resolution at 0.143 and 0.5, and Fourier correlation in the measured and in the
    missing-wedge region. For a family directory: spread/skill, interval coverage, CRPS
    (with --restored), the family mean's scores and, with --even/--odd, the halves check."""
    import json
    import sys

    from cryowae.cli.common import use_voxel_size
    from cryowae.errors import CryowaeInputError
    from cryowae.io import read_volume
    from cryowae.physics.geometry import TiltGeometry, find_tilt_file

    use_voxel_size(ctx, voxel_size, gt)  # the ground truth's voxel size is the one used
    if (restored / "family.json").is_file():
        _evaluate_family(restored, gt, tilt_min, tilt_max, tilt_axis, tilt_file,
                         voxel_size, as_json, out, single, even, odd, tomogram, sim_meta)
        return
    if any(v is not None for v in (single, even, odd, tomogram, sim_meta)):
        raise CryowaeInputError("--restored, --even, --odd, --tomogram and --sim-meta are "
                                "for a family directory (from `cryowae sample`)")

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
                     tomogram: Path | None, sim_meta: Path | None) -> None:
    import json
    import sys

    from cryowae.errors import CryowaeInputError
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import calibration_line, evaluate_family

    if voxel_size is not None and not voxel_size > 0:
        raise CryowaeInputError(f"--voxel-size must be positive, got {voxel_size:g}")
    meta = json.loads((family / "family.json").read_text())
    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=tilt_axis,
                                    fallback=TiltGeometry.from_dict(meta["geometry"]))
    report = evaluate_family(family, gt, single, geometry, voxel_size, tomogram, sim_meta,
                             even, odd)
    text = json.dumps(_finite_or_none(report), allow_nan=False)
    if out is not None:
        from cryowae.io import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(_finite_or_none(report), indent=2, allow_nan=False)
                           + "\n", encoding="utf-8")
    if as_json:
        sys.stdout.write(text + "\n")
        return
    print(f"{family} vs {gt} ({report['n_samples']} samples; truth: {report['truth']})")
    print(calibration_line(report))
    if "halves_check" in report:
        print(f"halves check (observed / predicted, median over shells): "
              f"{report['halves_check']['ratio_median']:.2f} (about 1 is right)")
    if out is not None:
        print(f"report written to {out}")


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
