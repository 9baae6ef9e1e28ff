"""Helpers shared by the command modules: console output, tilt geometry with a warning."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

if TYPE_CHECKING:
    from cryowae.physics.geometry import TiltGeometry

err_console = Console(stderr=True)
out_console = Console()


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
