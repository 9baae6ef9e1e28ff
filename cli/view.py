"""`cryowae view`: open tomograms, restorations and posterior families in napari.

napari is an optional extra: it is imported only inside the command, so `cryowae --help`
stays fast and an install without it gets one line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

INSTALL_HINT = "the viewer needs: pip install 'cryowae[napari]'"


def require_napari() -> None:
    """Raise `CryowaeInputError` with the install hint unless napari and a Qt binding load."""
    from cryowae.errors import CryowaeInputError

    try:
        import napari  # noqa: F401
        from qtpy import QtWidgets  # noqa: F401
    except Exception as exc:  # ImportError, or qtpy's QtBindingsNotFoundError
        reason = getattr(exc, "name", None) or type(exc).__name__
        raise CryowaeInputError(f"{INSTALL_HINT} (missing: {reason})") from None


def _has_display() -> bool:
    if sys.platform != "linux":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def view(
    paths: list[Path] = typer.Argument(None, help="Tomograms (.mrc .rec .map .st, OME-Zarr), "
                                       "restorations, or family directories (samples.zarr "
                                       "+ mean.mrc + std.mrc).", show_default=False),
    ndisplay: int = typer.Option(2, "--ndisplay", min=2, max=3,
                                 help="2 (slices) or 3 (volume rendering)."),
    grid: bool = typer.Option(False, "--grid", help="Show the layers side by side."),
    widget: bool = typer.Option(True, "--widget/--no-widget",
                                help="Open the Restore & sample panel."),
    screenshot: Path = typer.Option(None, "--screenshot", help="Render the canvas to this "
                                    "PNG and exit (starts a virtual X display, Xvfb, if "
                                    "none is set)."),
) -> None:
    """Open PATHS in napari with the cryowae reader (lazily: memory-mapped MRC, chunked
    Zarr) and the restore/sample panel."""
    from cryowae.errors import CryowaeInputError
    from cryowae.plugins._reader import path_kind

    paths = list(paths or [])
    for p in paths:
        if not p.exists():
            raise CryowaeInputError(f"{p}: no such file or directory")
        if path_kind(p) is None:
            raise CryowaeInputError(f"{p}: not an MRC file (.mrc .rec .map .st), OME-Zarr "
                                    "store or posterior-family directory")
    require_napari()
    if screenshot is not None:
        from cryowae.plugins._headless import ensure_display

        try:
            ensure_display()  # a virtual one if none is set; it ends with this process
        except RuntimeError as exc:
            raise CryowaeInputError(str(exc)) from None
    elif not _has_display():
        raise CryowaeInputError("no display to open the viewer on: set DISPLAY, run under "
                                "`xvfb-run -a`, or render with --screenshot FILE.png")
    import napari

    # the window is shown even for --screenshot: a hidden canvas renders black under Xvfb
    viewer = napari.Viewer()
    for p in paths:
        try:
            viewer.open(str(p), plugin="cryowae")
        except Exception as exc:  # napari wraps the reader's error: show its cause
            cause: BaseException = exc
            while cause.__cause__ is not None and not isinstance(cause, CryowaeInputError):
                cause = cause.__cause__
            viewer.close()
            raise CryowaeInputError(str(cause) if isinstance(cause, CryowaeInputError)
                                    else f"{p}: {cause}") from None
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9 keeps the grid there
    (canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid).enabled = grid
    viewer.dims.ndisplay = ndisplay
    if screenshot is not None:
        viewer.window.resize(1200, 900)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        viewer.screenshot(path=str(screenshot), canvas_only=True)
        viewer.close()
        typer.echo(f"wrote {screenshot}")
        return
    if widget:
        viewer.window.add_plugin_dock_widget("cryowae", "Restore & sample")
    napari.run()


def register(app: typer.Typer) -> None:
    app.command("view")(view)
