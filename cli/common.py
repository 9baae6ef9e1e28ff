"""Helpers shared by the command modules: console output, tilt geometry with a warning,
the input voxel size (``--voxel-size``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    from cryowae.physics.geometry import TiltGeometry

err_console = Console(stderr=True)
out_console = Console()

#: ``--voxel-size``: one definition for every command that reads tomograms
VOXEL_SIZE_OPTION = typer.Option(
    None, "--voxel-size", help="Voxel size of the input tomograms in Angstrom, for files "
    "that store none (TIFF without metadata, MRC with 0 or 1 in the header) [default: "
    "the file's, else 1.0, said in one line]; replaces a stored one (said in one line).")


def use_voxel_size(ctx: typer.Context, voxel_size: float | None,
                   *inputs: str | os.PathLike) -> None:
    """For the rest of the command running in `ctx`, read every tomogram with
    `voxel_size` where given (`cryowae.io.given_voxel_size`, left when the command
    ends), and say on stderr, one line per input, where its voxel size is assumed or
    replaced."""
    from cryowae.io import given_voxel_size, voxel_size_of

    ctx.with_resource(given_voxel_size(voxel_size))
    for path in inputs:
        note = voxel_size_of(path)[1]
        if note:
            err_console.print(note, soft_wrap=True, highlight=False, markup=False)


def resolve_geometry(tomogram: str | Path | None, tilt_min: float | None = None,
                     tilt_max: float | None = None, tilt_file: Path | None = None,
                     axis: str | None = None,
                     fallback: TiltGeometry | None = None) -> TiltGeometry:
    """`TiltGeometry.resolve` for a command's options (tilt file, range, a tilt file
    next to `tomogram`, `fallback`, the range the tomogram's own spectrum shows, else
    the default -60..60), saying on stderr when it uses the estimate and warning when it
    falls back to the default."""
    from cryowae.physics.geometry import TiltGeometry

    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=axis, tomogram=tomogram,
                                    fallback=fallback, estimate=True)
    where = f" next to {Path(tomogram).name}" if tomogram is not None else ""
    if geometry.source.startswith("estimated"):
        err_console.print(f"no tilt range given and no .tlt file found{where}; using "
                          f"{geometry.describe()} (set --tilt-min/--tilt-max or "
                          "--tilt-file to override)", soft_wrap=True, highlight=False)
    elif geometry.source == "default":
        err_console.print("[yellow]warning:[/] no tilt range given and no .tlt file found"
                          f"{where}, and the tomogram's spectrum shows no clear missing "
                          f"wedge about Y or X; assuming {geometry.tilt_min:g}.."
                          f"{geometry.tilt_max:g} degrees (set --tilt-min/--tilt-max or "
                          "--tilt-file)", soft_wrap=True)
    return geometry
