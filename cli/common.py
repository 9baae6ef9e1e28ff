"""Helpers shared by the command modules: tilt-range resolution, console output."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

err_console = Console(stderr=True)
out_console = Console()


def resolve_tilt_range(tomogram: str | Path, tilt_min: float | None, tilt_max: float | None,
                       tilt_file: Path | None) -> tuple[float, float, str]:
    """Tilt range (degrees) from, in order: a tilt file, the options, a tilt file next to
    the tomogram (<stem>.tlt, <stem>.rawtlt, tilts.tlt), or the default -60..60 with a
    warning. Returns (min, max, where it came from)."""
    from cryowae.io import read_tilt_angles
    from cryowae.physics.wedge import check_tilt_range

    if tilt_file is not None:
        a = read_tilt_angles(tilt_file)
        return float(a.min()), float(a.max()), f"tilt file {tilt_file}"
    if tilt_min is not None or tilt_max is not None:
        lo = -60.0 if tilt_min is None else tilt_min
        hi = 60.0 if tilt_max is None else tilt_max
        check_tilt_range(lo, hi)
        return lo, hi, "options"
    p = Path(tomogram)
    for cand in (p.with_suffix(".tlt"), p.with_suffix(".rawtlt"), p.parent / "tilts.tlt"):
        if cand.is_file():
            a = read_tilt_angles(cand)
            return float(a.min()), float(a.max()), f"tilt file {cand}"
    err_console.print("[yellow]warning:[/] no tilt range given and no .tlt file found next "
                      f"to {p.name}; assuming -60..60 degrees (set --tilt-min/--tilt-max)",
                      soft_wrap=True)
    return -60.0, 60.0, "default"
