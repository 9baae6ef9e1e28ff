"""`cryowae inspect`: shape, voxel size, intensities, contrast polarity and the missing
wedge a tomogram's own spectrum shows (`cryowae.inspection`)."""

from __future__ import annotations

from pathlib import Path

import typer

from cryowae.cli.common import VOXEL_SIZE_OPTION


def inspect(
    tomogram: Path = typer.Argument(..., help="Tomogram (MRC, TIFF stack or OME-Zarr).",
                                    show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of "
                                 "text (keys include tilt_axis, tilt_min, tilt_max, "
                                 "voxel_size)."),
    png: Path = typer.Option(None, "--png", help="Write a picture of the central Fourier "
                             "section holding the wedge (XZ for a Y tilt axis) with the "
                             "estimated wedge drawn on it."),
    voxel_size: float = VOXEL_SIZE_OPTION,
) -> None:
    """Report what TOMOGRAM holds: shape, voxel size, intensity statistics, contrast
    polarity (protein dark or bright) and the tilt axis and angular range its Fourier
    power shows (Y and Z swapped is reported as tilt axis Z)."""
    import json

    from cryowae.cli.common import err_console, out_console
    from cryowae.errors import CryowaeInputError
    from cryowae.inspection import inspect_tomogram, write_wedge_png

    if not tomogram.exists():
        raise CryowaeInputError(f"{tomogram}: no such file or directory")
    if png is not None and png.suffix.lower() != ".png":
        raise CryowaeInputError(f"--png {png}: the picture is written as PNG; name it "
                                "*.png")
    report = inspect_tomogram(tomogram, voxel_size=voxel_size)
    if report.voxel_note:
        err_console.print(report.voxel_note, soft_wrap=True, highlight=False, markup=False)
    if png is not None:
        from cryowae.io import read_volume

        with read_volume(tomogram) as vol:
            write_wedge_png(png, vol.data, report.wedge, title=tomogram.name)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), allow_nan=False))
        return
    for line in report.lines():
        out_console.print(line, highlight=False, soft_wrap=True, markup=False)
    if png is not None:
        out_console.print(f"picture: {png}", highlight=False, soft_wrap=True, markup=False)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
