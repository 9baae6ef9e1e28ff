"""Screenshots of the napari plugin for the docs, made headless (Xvfb + Mesa OpenGL).

    python docs/make_screenshots.py [--size 96] [--steps 150] [--out docs/images]

Simulates a tomogram, trains a restorer briefly, then drives the plugin as a user
would: opens the tomogram with the cryowae reader, sets the checkpoint in the
"Restore & sample" panel, presses Restore and Sample and waits for the worker threads.
It writes PNGs to --out:

* ``viewer_widget.png``          the whole window: layers, the panel, a restored slice
* ``viewer_raw_restored_std.png`` raw | restored | posterior std (+ ground truth), XY
* ``viewer_raw_restored_std_xz.png`` the same in an XZ section (the missing wedge
  elongates features along Z; the restoration shortens them again)
* ``viewer_3d.png``              3D rendering of the restoration with the std overlay
* ``viewer_fourier.png``         log |F| of the central XZ section (ky = 0): raw vs.
  restored; the raw one has an empty wedge about kz, the restored one fills it

With ``--time-open`` it also times opening a 256 x 512 x 512 float32 MRC lazily (reader
call, layer added, first render) and prints the figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _log(msg: str) -> None:
    print(msg, flush=True)


def simulate(work: Path, size: int, seed: int) -> Path:
    from cryowae.simulation import SimulationConfig, write_simulation

    sim = work / f"sim{size}"
    if not (sim / "tomo.mrc").is_file():
        _log(f"simulating a {size}^2 tomogram (seed {seed}) in {sim}")
        write_simulation(sim, SimulationConfig(size=size, seed=seed), overwrite=True)
    return sim


def train(work: Path, sim: Path, steps: int, minutes: float | None) -> Path:
    from cryowae.cli.progress import RichProgress
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train as run_training

    run = work / f"run_{sim.name}_{steps}"
    if (run / "model.pt").is_file():
        return run / "model.pt"
    cfg = load_config("cpu-small").replace(steps=steps, minutes=minutes, patch_size=32,
                                           checkpoint_every=max(25, steps))
    sources = load_sources([sim / "tomo.mrc"], [sim / "tomo_even.mrc"], [sim / "tomo_odd.mrc"],
                           min_size=cfg.patch_size)
    _log(f"training {steps} steps (cpu-small, patch 32) in {run}")
    res = run_training(sources, cfg, run, progress=RichProgress(transient=True))
    _log(f"trained {res.steps} steps in {res.elapsed_s:.0f} s, final loss "
         f"{res.final.get('loss', float('nan')):.4g}")
    return run / "model.pt"


def _wait(app, widget, timeout: float = 1800.0) -> None:
    t0 = time.monotonic()
    while widget.running:
        app.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("the plugin's job did not finish")
    app.processEvents()


def _show_only(viewer, names: list[str]) -> list:
    for layer in viewer.layers:
        layer.visible = layer.name in names
    return [viewer.layers[n] for n in names]


def _camera(viewer):
    scene = getattr(viewer, "scene", None)  # napari >= 0.9
    return scene.camera if scene is not None else viewer.camera


def _grid(viewer):
    canvas = getattr(viewer, "canvas", None)  # napari >= 0.9
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def _caption(viewer, text: str) -> None:
    """A line of text over the canvas (napari's text overlay)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    overlay = overlays.text if overlays is not None else viewer.text_overlay
    overlay.text = text
    overlay.visible = bool(text)
    overlay.color = "white"
    overlay.font_size = 13
    try:
        overlay.position = "top_center"
    except (ValueError, TypeError):
        pass


def _fit(viewer, layers: list | None = None) -> None:
    """Fit the camera to the layers in the viewer (hidden ones included)."""
    del layers
    viewer.reset_view()


def _frame_volume(viewer, layer, fill: float = 0.92) -> None:
    """2D: centre the camera on `layer`'s YX extent and fill the canvas with it (the
    Fourier pair beside the volume would otherwise count in a plain reset_view)."""
    h, w = np.asarray(viewer.screenshot(canvas_only=True)).shape[:2]
    lo, hi = np.asarray(layer.extent.world)[:, -2:]
    camera = _camera(viewer)
    camera.center = tuple((lo + hi) / 2)
    camera.zoom = fill * min(h / (hi[0] - lo[0]), w / (hi[1] - lo[1]))


def _focus_canvas(viewer) -> None:
    """Hide the side panels (layer list, controls, cryowae panel) for canvas shots."""
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    for dock in ("dockLayerList", "dockLayerControls"):
        widget = getattr(qt_viewer, dock, None)
        if widget is not None:
            widget.hide()
    for dock in list(getattr(viewer.window, "_dock_widgets", {}).values()):
        dock.hide()


def _save(viewer, path: Path, canvas_only: bool = True) -> None:
    img = viewer.screenshot(path=str(path), canvas_only=canvas_only)
    rgb = np.asarray(img)[..., :3]
    _log(f"wrote {path} {rgb.shape[1]}x{rgb.shape[0]}, pixel std {rgb.std():.1f}")
    if rgb.std() < 1.0:
        raise RuntimeError(f"{path}: the rendering is blank")


def screenshots(sim: Path, model: Path, out: Path, n_samples: int) -> None:
    import napari
    from qtpy.QtWidgets import QApplication

    from cryowae.plugins._widget import CryowaeWidget

    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="cryowae")  # shown: a hidden canvas renders black
    viewer.window.resize(1500, 950)
    app = QApplication.instance()
    [raw] = viewer.open(str(sim / "tomo.mrc"), plugin="cryowae")
    raw.name = "tomo"
    [gt] = viewer.open(str(sim / "gt.mrc"), plugin="cryowae")
    gt.name = "ground truth"
    gt.visible = False
    widget = CryowaeWidget(viewer)
    viewer.window.add_dock_widget(widget, name="cryowae: Restore & sample", area="right")
    widget.checkpoint.value = model
    widget.layer.value = raw
    for kind in ("restore", "sample"):
        widget.n_samples.value = n_samples
        t0 = time.perf_counter()
        widget.start(kind)
        _wait(app, widget)
        _log(f"{kind}: {time.perf_counter() - t0:.1f} s -> {widget.status.value}")
        widget.layer.value = raw
    names = [ly.name for ly in viewer.layers]
    _log("layers: " + ", ".join(names))
    for need in ("tomo restored", "tomo samples", "tomo std", "tomo |F| raw"):
        if need not in names:
            raise RuntimeError(f"the plugin did not add {need!r}")
    restored, std = viewer.layers["tomo restored"], viewer.layers["tomo std"]
    nz = raw.data.shape[0]

    # the whole window: panel, layer list, a restored slice with the std overlay
    _show_only(viewer, ["tomo restored", "tomo std"])
    viewer.dims.set_point(viewer.dims.ndim - 3, raw.translate[0] + raw.scale[0] * (nz // 2))
    app.processEvents()
    _frame_volume(viewer, restored)
    app.processEvents()
    _save(viewer, out / "viewer_widget.png", canvas_only=False)
    _focus_canvas(viewer)
    viewer.window.resize(1600, 700)
    # keep only same-sized 3D volumes so that fitting the view frames them
    fourier = [viewer.layers.pop(viewer.layers.index(n))
               for n in ("tomo |F| raw", "tomo |F| restored")]
    viewer.layers.remove("tomo samples")
    app.processEvents()

    # raw | restored | std | ground truth, side by side (grid), XY and XZ sections
    std_overlay = dict(blending=std.blending, opacity=std.opacity)
    std.blending, std.opacity = "translucent", 1.0
    order = ["tomo", "tomo restored", "tomo std", "ground truth"]
    for name in order:  # to the top of the list, in this order
        viewer.layers.move(viewer.layers.index(name), len(viewer.layers))
    shown = _show_only(viewer, order)
    grid = _grid(viewer)
    grid.enabled = True
    grid.shape = (1, 4)
    _fit(viewer, shown)
    _caption(viewer, "XY section:   raw tomogram  |  restored  |  posterior std  |  "
                     "ground truth")
    app.processEvents()
    _save(viewer, out / "viewer_raw_restored_std.png")
    viewer.dims.order = (1, 0, 2)  # display (Z, X) and slice through Y
    viewer.dims.set_point(1, raw.translate[1] + raw.scale[1] * (raw.data.shape[1] // 2))
    _fit(viewer, shown)
    _caption(viewer, "XZ section (Z up):   raw tomogram  |  restored  |  posterior std  |  "
                     "ground truth")
    app.processEvents()
    _save(viewer, out / "viewer_raw_restored_std_xz.png")
    viewer.dims.order = (0, 1, 2)
    grid.enabled = False
    std.blending, std.opacity = std_overlay["blending"], std_overlay["opacity"]

    # 3D: restoration and posterior std side by side
    viewer.window.resize(1600, 900)
    shown = _show_only(viewer, ["tomo restored", "tomo std"])
    lo, hi = restored.contrast_limits
    restored.rendering = "attenuated_mip"
    restored.contrast_limits = (lo + 0.45 * (hi - lo), hi)
    std.blending = "translucent"
    grid.enabled = True
    grid.shape = (1, 2)
    viewer.dims.ndisplay = 3
    _fit(viewer, shown)
    camera = _camera(viewer)
    camera.angles = (15, -35, 130)
    camera.zoom *= 0.62
    _caption(viewer, "3D:   restored (attenuated MIP)  |  posterior std")
    app.processEvents()
    _save(viewer, out / "viewer_3d.png")
    grid.enabled = False
    viewer.dims.ndisplay = 2
    restored.contrast_limits = (lo, hi)
    std.blending = std_overlay["blending"]

    # Fourier amplitude of the central XZ section, raw vs restored
    viewer.window.resize(1300, 700)
    viewer.layers.clear()
    for layer in fourier:
        layer.visible = True
        viewer.add_layer(layer)
    _fit(viewer)
    _caption(viewer, "log |F|, central XZ section (ky = 0), kz vertical:   raw  |  restored "
                     "(the empty wedge about kz is filled)")
    app.processEvents()
    _save(viewer, out / "viewer_fourier.png")
    viewer.close()


def time_lazy_open(work: Path, shape=(256, 512, 512)) -> dict[str, float]:
    """Time the plugin opening a large MRC: reader + layer + first render."""
    import mrcfile
    import napari

    from cryowae.plugins._reader import napari_get_reader

    t_import = time.perf_counter()
    import cryowae.io  # noqa: F401  (the reader's I/O stack: mrcfile, zarr, ome-zarr)

    t_import = time.perf_counter() - t_import
    from qtpy.QtWidgets import QApplication

    path = work / "big_{}x{}x{}.mrc".format(*shape)
    if not path.is_file():
        _log(f"writing {path} ({np.prod(shape) * 4 / 2**20:.0f} MB)")
        with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as m:
            rng = np.random.default_rng(0)
            for z in range(0, shape[0], 16):
                m.data[z:z + 16] = rng.normal(size=(min(16, shape[0] - z), *shape[1:]))
            m.voxel_size = 10.0
    dropped = False
    try:  # cold page cache, when allowed (root, not in every container)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dropped = True
    except OSError:
        pass
    viewer = napari.Viewer()
    viewer.window.resize(1200, 900)
    app = QApplication.instance()
    app.processEvents()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    layer_data = napari_get_reader(str(path))(str(path))
    t1 = time.perf_counter()
    data, kwargs, _ = layer_data[0]
    layer = viewer.add_image(data, **kwargs)
    t2 = time.perf_counter()
    img = viewer.screenshot(canvas_only=True)  # forces the first draw
    t3 = time.perf_counter()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = {"reader_s": t1 - t0, "add_layer_s": t2 - t1, "first_render_s": t3 - t2,
           "total_s": t3 - t0, "io_import_s": t_import, "peak_rss_growth_mb": (rss1 - rss0) / 1024,
           "file_mb": path.stat().st_size / 2**20, "cold_cache": float(dropped),
           "lazy": float(isinstance(layer.data, np.memmap)),
           "rendered": float(np.asarray(img)[..., :3].std() > 1)}
    viewer.close()
    _log("lazy open of {} float32 ({:.0f} MB, {} page cache): reader {:.3f} s, layer "
         "added {:.3f} s, first render {:.3f} s, total {:.3f} s; peak RSS grew "
         "{:.0f} MB; data is a memmap: {} (first import of cryowae.io, not counted: "
         "{:.2f} s)".format(
             "x".join(map(str, shape)), res["file_mb"], "cold" if dropped else "warm",
             res["reader_s"], res["add_layer_s"], res["first_render_s"], res["total_s"],
             res["peak_rss_growth_mb"], bool(res["lazy"]), t_import))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="simulated field (voxels)")
    ap.add_argument("--steps", type=int, default=150, help="training steps")
    ap.add_argument("--minutes", type=float, default=None, help="training time cap")
    ap.add_argument("--samples", type=int, default=8, help="family size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "images")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cryowae_screenshots"))
    ap.add_argument("--time-open", action="store_true",
                    help="also time the lazy opening of a 256x512x512 MRC")
    ap.add_argument("--only-time-open", action="store_true")
    a = ap.parse_args(argv)
    _log("$ " + " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv]))
    from cryowae.plugins._headless import ensure_display

    ensure_display((1700, 1100))  # Xvfb when no DISPLAY; ends with this process
    a.work.mkdir(parents=True, exist_ok=True)
    if not a.only_time_open:
        sim = simulate(a.work, a.size, a.seed)
        model = train(a.work, sim, a.steps, a.minutes)
        screenshots(sim, model, a.out, a.samples)
    if a.time_open or a.only_time_open:
        time_lazy_open(a.work)


if __name__ == "__main__":
    main()
