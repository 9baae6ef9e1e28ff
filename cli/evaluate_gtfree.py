"""`cryowae evaluate RESTORED [--tomogram RAW]` without `--gt`: the ground-truth-free
figures of a restoration (`cryowae.metrics.groundtruth_free`), as a table or JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def evaluate_without_truth_cli(restored: Path, *, tomogram: Path | None, even: Path | None,
                               odd: Path | None, points: Path | None, normals: Path | None,
                               annotation_scale: float | None, tilt_min: float | None,
                               tilt_max: float | None, tilt_axis: str | None,
                               tilt_file: Path | None, voxel_size: float | None,
                               as_json: bool, out: Path | None,
                               family_only: dict[str, Any]) -> None:
    """Parse the options of `cryowae evaluate` without --gt, score, print, write."""
    from cryowae.cli.evaluate import _finite_or_none
    from cryowae.errors import CryowaeInputError
    from cryowae.io import read_volume
    from cryowae.metrics.groundtruth_free import evaluate_without_truth
    from cryowae.metrics.visibility import Annotation
    from cryowae.physics.geometry import TiltGeometry, find_tilt_file

    used = [k for k, v in family_only.items() if v is not None]
    if used:
        raise CryowaeInputError(f"{', '.join(used)} {'is' if len(used) == 1 else 'are'} for "
                                "a family directory (from `cryowae sample`) with --gt")
    if (even is None) != (odd is None):
        raise CryowaeInputError("--even and --odd go together: give both halves")
    if points is not None and normals is None:
        raise CryowaeInputError("--points needs --normals (the visibility figure needs "
                                "each point's normal)")
    if annotation_scale is not None and normals is None:
        raise CryowaeInputError("--annotation-scale needs --normals")
    if voxel_size is not None and not voxel_size > 0:
        raise CryowaeInputError(f"--voxel-size must be positive, got {voxel_size:g}")
    annotation = (Annotation.from_files(points, normals, 1.0 if annotation_scale is None
                                        else annotation_scale)
                  if normals is not None else None)

    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=tilt_axis, tomogram=restored)
    near_raw = (find_tilt_file(tomogram) if geometry.source == "default"
                and tomogram is not None else None)
    if near_raw is not None:
        geometry = TiltGeometry.from_file(near_raw, geometry.axis)
    rvol = read_volume(restored, check_nan=True)
    raw = read_volume(tomogram, check_nan=True) if tomogram is not None else None
    halves = ((read_volume(even, check_nan=True), read_volume(odd, check_nan=True))
              if even is not None and odd is not None else None)
    ref = raw if raw is not None else rvol
    vs = float(voxel_size) if voxel_size is not None else float(ref.voxel_size)
    warnings: list[str] = []
    if geometry.source == "default":
        where = restored.name + (f" or {tomogram.name}" if tomogram is not None else "")
        warnings.append(f"no tilt range given and no tilt file found next to {where}; "
                        "assuming -60..60 degrees (set --tilt-min/--tilt-max or "
                        "--tilt-file)")
    if raw is not None and voxel_size is None and abs(
            rvol.voxel_size - raw.voxel_size) > 1e-3 * vs:
        warnings.append(f"voxel sizes differ ({rvol.voxel_size:g} A in {restored.name}, "
                        f"{raw.voxel_size:g} A in {tomogram.name}); using the raw "  # type: ignore[union-attr]
                        f"tomogram's {vs:g} A")

    report = evaluate_without_truth(
        rvol.numpy(), vs, geometry, raw=raw.numpy() if raw is not None else None,
        halves=(halves[0].numpy(), halves[1].numpy()) if halves is not None else None,
        annotation=annotation)
    report = {"restored_path": str(restored),
              "raw_path": str(tomogram) if tomogram is not None else None, **report}
    if halves is not None:
        report["halves"] = {"even": str(even), "odd": str(odd), **report["halves"]}
    if annotation is not None:
        report["annotation"] = {"points": str(points) if points is not None else None,
                                "normals": str(normals), "n_points": len(annotation.points),
                                "scale": 1.0 if annotation_scale is None
                                else float(annotation_scale)}
    if warnings:
        report["warnings"] = warnings
    clean = _finite_or_none(report)
    if out is not None:
        from cryowae.io import atomic_path

        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n",
                           encoding="utf-8")
    for w in warnings:
        print(f"cryowae: warning: {w}", file=sys.stderr)
    if as_json:
        sys.stdout.write(json.dumps(clean, allow_nan=False) + "\n")
        return
    _print_table(clean, out)


def _num(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _print_table(report: dict[str, Any], out: Path | None) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [n for n in ("raw", "restored") if n in report]
    paths = {"raw": report.get("raw_path"), "restored": report["restored_path"]}
    band = report["band_cycles_per_voxel"]
    band_text = ("no shell above the noise floor" if band is None else
                 f"{report['band_A'][1]:.0f}-{report['band_A'][0]:.0f} A")
    vs_raw = f" (raw: {Path(paths['raw']).name})" if len(names) > 1 else ""  # type: ignore[arg-type]
    t = Table(title=f"{Path(report['restored_path']).name}{vs_raw} without ground truth  "
              f"({' x '.join(map(str, report['shape']))} voxels, {report['voxel_size_A']:g} A, "
              f"tilts {report['tilt_min']:g}..{report['tilt_max']:g} deg about "
              f"{report['tilt_axis'].upper()}, {report['tilt_source']})")
    t.add_column("figure")
    for n in names:
        t.add_column(n if len(names) > 1 else Path(paths[n]).name,  # type: ignore[arg-type]
                     justify="right")
    t.add_column("meaning")

    def row(label: str, get: Any, fmt: str, meaning: str) -> None:
        t.add_row(label, *(_num(get(report[n]), fmt) for n in names), meaning)

    row("wedge fill", lambda r: r["wedge_fill"], ".3f",
        f"wedge / measured power, {band_text} (0 empty, ~1 isotropic)")
    row("streak ratio", lambda r: r["streak_ratio"], ".2f",
        f"edge / flanking elevations, {len(report['empty_blocks'])} empty "
        f"{report['block']}^3 blocks (~1 none)")
    if "visibility" in report[names[0]]:
        vis = [report[n]["visibility"] for n in names]
        row("visibility ratio", lambda r: r["visibility"]["visibility_ratio"], ".3f",
            "beam- / side-facing contrast (~1 tops as visible as sides)")
        row("contrast beam", lambda r: r["visibility"]["contrast_beam"], ".3f",
            f"layer - flanks along normals, in std ({vis[0]['n_beam']} patches)")
        row("contrast side", lambda r: r["visibility"]["contrast_side"], ".3f",
            f"same ({vis[0]['n_side']} patches)")
    console = Console()
    console.print(t)
    if "halves" in report:
        h = report["halves"]
        console.print(f"halves {Path(h['even']).name} / {Path(h['odd']).name}: FSC 0.143 at "
                      f"{_num(h['fsc_0143_A'], '.1f')} A, 0.5 at {_num(h['fsc_05_A'], '.1f')} A;"
                      f" Fourier CC measured {_num(h['cc_measured'], '.3f')}, wedge "
                      f"{_num(h['cc_wedge'], '.3f')}", highlight=False)
    if out is not None:
        console.print(f"report written to {out}")
