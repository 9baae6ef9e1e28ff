"""napari plugin: manifest, lazy reader, display helpers, dock widget, `cryowae view`.

The GUI tests render for real: napari on an Xvfb server with Mesa's software OpenGL.
A session fixture starts Xvfb when no DISPLAY is set, so plain `pytest` works. They are
skipped only when napari is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc, write_ome_zarr
from cryowae.physics.wedge import apply_wedge
from cryowae.plugins._display import fourier_section, robust_limits, subsample
from cryowae.plugins._reader import napari_get_reader

HAS_NAPARI = importlib.util.find_spec("napari") is not None
NO_NAPARI = "napari is not installed (pip install 'cryowae[napari]')"
needs_napari = pytest.mark.skipif(not HAS_NAPARI, reason=NO_NAPARI)
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins"
GUI_MODULES = ("napari", "PySide6", "PyQt5", "PyQt6", "qtpy", "magicgui", "vispy", "superqt")


def _wedged(shape=(24, 32, 40), seed=0) -> np.ndarray:
    """Smooth random structure seen through a -60..60 degree wedge (tilt axis Y)."""
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    v = torch.nn.functional.avg_pool3d(v, 3, stride=1, padding=1)[0, 0]
    x = apply_wedge(v * 5).numpy() + 0.05 * rng.normal(size=shape).astype(np.float32)
    return (2.0 * x + 5.0).astype(np.float32)


@pytest.fixture()
def tomo_mrc(tmp_path) -> Path:
    path = tmp_path / "tomo.mrc"
    write_mrc(path, _wedged(), voxel_size=10.0, origin=(100.0, 200.0, 300.0))
    return path


@pytest.fixture()
def family_dir(tmp_path) -> Path:
    """A posterior-family directory as `cryowae sample` writes it (S = 5)."""
    d = tmp_path / "fam"
    rng = np.random.default_rng(1)
    samples = (_wedged((16, 32, 32))[None] + rng.normal(size=(5, 16, 32, 32))).astype("f4")
    write_ome_zarr(d / "samples.zarr", samples, voxel_size=8.0, extra_axes=("s",))
    write_mrc(d / "mean.mrc", samples.mean(0), voxel_size=8.0)
    write_mrc(d / "std.mrc", samples.std(0), voxel_size=8.0)
    (d / "family.json").write_text(json.dumps({"parameters": {"n_samples": 5}}))
    return d


# --------------------------------------------------------------------- manifest, imports
@pytest.mark.slow  # 6.0 s: imports every contribution
def test_manifest_validates_and_resolves():
    npe2 = pytest.importorskip("npe2", reason=NO_NAPARI)
    pm = npe2.PluginManifest.from_file(PLUGIN_DIR / "napari.yaml")
    assert pm.name == "cryowae"
    c = pm.contributions
    assert c.readers and c.readers[0].accepts_directories
    assert {"*.mrc", "*.rec", "*.map", "*.st"} <= set(c.readers[0].filename_patterns)
    assert c.sample_data and c.widgets
    installed = npe2.PluginManifest.from_distribution("cryowae")  # the entry point
    assert installed.name == "cryowae"
    if HAS_NAPARI:
        installed.validate_imports()  # every python_name imports and exists (what
        # `npe2 validate --imports cryowae` runs, without a second interpreter)


@pytest.mark.slow
def test_core_cli_and_reader_do_not_import_qt():
    """A cluster install needs no Qt: the library, the CLI and the plugin's non-GUI
    modules import in a fresh interpreter without any GUI package."""
    code = ("import sys, cryowae.cli.main, cryowae.io, cryowae.training.loop, "
            "cryowae.inference.restore, cryowae.sampling, cryowae.plugins, "
            "cryowae.plugins._reader, cryowae.plugins._jobs, cryowae.plugins._sample_data; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}); "
            "print(','.join(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"GUI modules imported: {proc.stdout}"


@pytest.mark.slow  # 3.0 s: a second interpreter
def test_view_without_napari_says_how_to_install(tomo_mrc):
    blocker = (
        "import sys, importlib.abc\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('napari', 'qtpy', 'PySide6', 'PyQt5'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, B())\n"
        "from cryowae.cli.main import main\n"
        f"main(['view', {str(tomo_mrc)!r}])\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cryowae[napari]'" in lines[0], proc.stderr


def test_view_refuses_missing_and_foreign_files(tmp_path):
    from .conftest import invoke_cli

    proc = invoke_cli("view", tmp_path / "nope.mrc")
    assert proc.returncode == 2 and "no such file" in proc.stderr
    (tmp_path / "notes.txt").write_text("hi")
    proc = invoke_cli("view", tmp_path / "notes.txt")
    assert proc.returncode == 2 and "not an MRC file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------- jobs (no GUI)
def test_jobs_use_the_library_cache_warning_and_geometry(tiny_model_path, tmp_path):
    """The panel's work: the library's model cache, its voxel-size warning, and tilt
    settings parsed into a TiltGeometry (blank: the restorer's own)."""
    from cryowae.inference.restore import voxel_size_warning
    from cryowae.models.cache import cached_restorer
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.plugins._jobs import (
        JobInput,
        ThreadProgress,
        check_compatible,
        load_checkpoint,
        tilt_geometry,
    )

    r = load_checkpoint(tiny_model_path)
    assert load_checkpoint(tiny_model_path.parent) is r
    assert cached_restorer(tiny_model_path, str(r.device)) is r
    assert tilt_geometry("", "model", r) == r.geometry
    assert tilt_geometry(" -50, 40 ", "x", r) == TiltGeometry(-50, 40, "x")
    assert tilt_geometry("-45..45", "model", r) == TiltGeometry(-45, 45, r.geometry.axis)
    tlt = tmp_path / "a.tlt"
    np.savetxt(tlt, np.arange(-54.0, 55.0, 3.0))
    assert tilt_geometry(str(tlt), "y", r).tilt_range == (-54.0, 54.0)
    for text, axis, msg in (("sixty", "model", "MIN,MAX"), ("70,-70", "model", "impossible"),
                            ("", "z", "tilt axis")):
        with pytest.raises(CryowaeInputError, match=msg):
            tilt_geometry(text, axis, r)
    prog = ThreadProgress()
    inp = JobInput(np.zeros((16, 16, 16), np.float32), "t", voxel_size=15.0)
    check_compatible(r, inp, TiltGeometry(-60, 60, "x"), prog)
    warnings = prog.pop_messages()
    assert warnings[0] == voxel_size_warning(15.0, r.voxel_size)
    assert "tilt axis Y" in warnings[1]
    with pytest.raises(CryowaeInputError, match="choose a checkpoint"):
        load_checkpoint("")


def test_cancelled_job_raises_the_one_cancel_exception(tiny_model_path):
    from cryowae.plugins._jobs import JobInput, ThreadProgress, restore_job
    from cryowae.progress import Cancelled

    prog = ThreadProgress()
    prog.cancel()
    with pytest.raises(Cancelled):
        restore_job(tiny_model_path, JobInput(_wedged(), "t", 10.0), progress=prog,
                    tile=16, overlap=4)


# --------------------------------------------------------------------- reader (no GUI)
def test_reader_mrc_is_lazy_with_scale_and_translate(tomo_mrc, tmp_path):
    reader = napari_get_reader(str(tomo_mrc))
    assert reader is not None
    [(data, kw, kind)] = reader(str(tomo_mrc))
    assert kind == "image" and isinstance(data, np.memmap)  # not a loaded copy
    assert data.shape == (24, 32, 40)
    assert kw["scale"] == (10.0, 10.0, 10.0)
    assert kw["translate"] == (100.0, 200.0, 300.0)
    lo, hi = kw["contrast_limits"]
    assert np.isfinite([lo, hi]).all() and lo < hi
    assert kw["metadata"]["cryowae"]["voxel_size"] == 10.0
    for suffix in (".rec", ".map", ".st"):
        other = tmp_path / f"copy{suffix}"
        other.write_bytes(tomo_mrc.read_bytes())
        assert napari_get_reader(str(other)) is not None
    (tmp_path / "notes.txt").write_text("hi")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "empty_dir")) is None


def test_reader_ome_zarr_pyramid_is_multiscale_and_lazy(tmp_path):
    path = tmp_path / "tomo.zarr"
    write_ome_zarr(path, _wedged((32, 64, 64)), voxel_size=12.5, origin=(0.0, 5.0, 10.0))
    [(data, kw, _)] = napari_get_reader(str(path))(str(path))
    assert kw["multiscale"] is True and isinstance(data, list) and len(data) == 3
    assert all(isinstance(a, zarr.Array) for a in data)
    assert [a.shape for a in data] == [(32, 64, 64), (16, 32, 32), (8, 16, 16)]
    assert kw["scale"] == (12.5, 12.5, 12.5) and kw["translate"] == (0.0, 5.0, 10.0)


def test_reader_family_has_sample_axis(family_dir):
    layers = napari_get_reader(str(family_dir))(str(family_dir))
    by_kind = {kw["metadata"]["cryowae"]["kind"]: (d, kw) for d, kw, _ in layers}
    assert set(by_kind) == {"samples", "mean", "std"}
    samples, kw = by_kind["samples"]
    level0 = samples[0] if isinstance(samples, list) else samples
    assert isinstance(level0, zarr.Array) and level0.shape == (5, 16, 32, 32)
    assert kw["scale"] == (1.0, 8.0, 8.0, 8.0)
    assert isinstance(by_kind["mean"][0], np.memmap)
    std_kw = by_kind["std"][1]
    assert std_kw["colormap"] == "magma" and std_kw["blending"] == "additive"
    assert std_kw["contrast_limits"][0] < std_kw["contrast_limits"][1]
    assert kw["metadata"]["cryowae"]["family"]["parameters"]["n_samples"] == 5


def test_reader_bare_samples_store_derives_mean_and_std_lazily(family_dir, tmp_path):
    import dask.array as da

    bare = tmp_path / "alone" / "samples.zarr"
    bare.parent.mkdir()
    os.rename(family_dir / "samples.zarr", bare)
    layers = napari_get_reader(str(bare))(str(bare))
    kinds = [kw["metadata"]["cryowae"]["kind"] for _, kw, _ in layers]
    assert kinds == ["samples", "mean", "std"]
    std = layers[2][0]
    std0 = std[0] if isinstance(std, list) else std
    assert isinstance(std0, da.Array) and std0.shape == (16, 32, 32)


# --------------------------------------------------------------------- display helpers
class _CountingArray:
    """Wraps an array and counts the voxels read through indexing."""

    def __init__(self, arr: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
        self.arr, self.read = arr, 0
        self.shape, self.dtype, self.ndim = arr.shape, arr.dtype, arr.ndim
        if chunks is not None:
            self.chunks = chunks

    def __getitem__(self, key):
        out = self.arr[key]
        self.read += np.size(out)
        return out


@pytest.mark.parametrize("chunks", [None, (64, 64, 64)])
def test_contrast_limits_read_a_small_subsample(chunks):
    arr = np.random.default_rng(0).normal(size=(128, 256, 256)).astype(np.float32)
    wrapped = _CountingArray(arr, chunks)
    lo, hi = robust_limits(wrapped, 1, 99)
    assert wrapped.read < 0.05 * arr.size
    assert -2.6 < lo < -2.0 and 2.0 < hi < 2.6  # standard normal: +-2.33
    assert subsample(np.zeros((4, 8, 8))).size == 256  # small arrays: read whole


def test_fourier_section_shows_the_missing_wedge():
    vol = _wedged((48, 48, 48))
    sec = fourier_section(vol, "y")
    assert sec.shape == (48, 48) and np.isfinite(sec).all()
    kz, kx = np.meshgrid(np.arange(48) - 24, np.arange(48) - 24, indexing="ij")
    elev = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))
    ring = (np.hypot(kz, kx) > 4) & (np.hypot(kz, kx) < 20)
    wedge, measured = sec[ring & (elev > 70)], sec[ring & (elev < 50)]
    assert np.median(measured) - np.median(wedge) > 2.0  # log amplitude: e^2 ~ 7x


# --------------------------------------------------------------------- GUI
@pytest.fixture(scope="session")
def virtual_display():
    """DISPLAY for Qt: the caller's, or an Xvfb server started here (Mesa GL)."""
    if not HAS_NAPARI:
        pytest.skip(NO_NAPARI)
    from cryowae.plugins._headless import ensure_display

    ensure_display()  # raises with the apt-get line if Xvfb is missing
    # the server ends with this process: stopping it under the live QApplication
    # would make Qt abort the run
    return os.environ["DISPLAY"]


@pytest.fixture()
def viewer(virtual_display, monkeypatch):
    """A shown napari viewer (a hidden canvas renders black under Xvfb). Exceptions
    raised in Qt callbacks (which Qt only prints) fail the test."""
    import napari

    errors = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc: errors.append(exc))
    v = napari.Viewer(show=True)
    v.window.resize(1100, 800)
    yield v
    v.close()
    assert not errors, f"exceptions in Qt callbacks: {[e[1] for e in errors]}"


def _wait_until(predicate, timeout: float = 60.0) -> None:
    """Run the Qt event loop until `predicate()` holds."""
    from qtpy.QtWidgets import QApplication

    app, t0 = QApplication.instance(), time.monotonic()
    while not predicate():
        app.processEvents()
        time.sleep(0.002)
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s")
    app.processEvents()


def _rendered(img: np.ndarray) -> bool:
    rgb = img[..., :3]
    return img.size > 0 and rgb.std() > 1.0 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_viewer_opens_tomogram_lazily_and_family_with_slider(viewer, tomo_mrc, family_dir):
    [layer] = viewer.open(str(tomo_mrc), plugin="cryowae")
    assert isinstance(layer.data, np.memmap) and layer.data.shape == (24, 32, 40)
    np.testing.assert_allclose(layer.scale, [10, 10, 10])
    np.testing.assert_allclose(layer.translate, [100, 200, 300])
    viewer.layers.clear()
    layers = viewer.open(str(family_dir), plugin="cryowae")
    names = [ly.name for ly in layers]
    assert names == ["fam samples", "fam mean", "fam std"]
    samples = layers[0]
    assert samples.ndim == 4 and samples.multiscale
    assert samples.data[0].shape == (5, 16, 32, 32)
    np.testing.assert_allclose(samples.scale, [1, 8, 8, 8])
    assert viewer.dims.ndim == 4 and viewer.dims.nsteps[0] == 5  # slider over S
    assert layers[2].colormap.name == "magma" and layers[2].blending == "additive"
    layers[2].visible = False  # toggleable
    layers[2].visible = True
    assert _rendered(viewer.screenshot(canvas_only=True))


def _widget(viewer, checkpoint):
    from cryowae.plugins._widget import CryowaeWidget

    w = CryowaeWidget(viewer)
    viewer.window.add_dock_widget(w, name="cryowae")
    w.checkpoint.value = checkpoint
    return w


def _run_job(w, kind):
    """Start a job, check the event loop keeps running while it works; return ticks."""
    from qtpy.QtCore import QTimer

    ticks = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    button = w.restore_button if kind == "restore" else w.sample_button
    button.native.click()
    assert w.running  # returned at once: the work is in another thread
    _wait_until(lambda: not w.running)
    timer.stop()
    return ticks


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_widget_restores_and_samples_without_blocking(viewer, tomo_mrc,
                                                      tiny_model_path, monkeypatch):
    import cryowae.inference.restore as restore_mod

    threads = []
    real = restore_mod.restore_array

    def spy(*a, **k):
        threads.append(threading.current_thread())
        time.sleep(0.3)  # long enough that a blocked event loop would show
        return real(*a, **k)

    monkeypatch.setattr(restore_mod, "restore_array", spy)
    [raw] = viewer.open(str(tomo_mrc), plugin="cryowae")
    w = _widget(viewer, tiny_model_path)
    assert w.layer.value is raw
    ticks = _run_job(w, "restore")
    assert threads and threads[0] is not threading.main_thread()
    assert len(ticks) >= 10, "the event loop stalled while restoring"
    restored = viewer.layers["tomo restored"]
    assert restored.data.shape == (24, 32, 40) and restored.ndim == 3
    np.testing.assert_allclose(restored.scale, raw.scale)
    # identity model: restoration equals the input
    np.testing.assert_allclose(restored.data, np.asarray(raw.data), atol=1e-3)
    f_raw, f_res = viewer.layers["tomo |F| raw"], viewer.layers["tomo |F| restored"]
    assert f_raw.ndim == 2 and f_raw.data.shape == (24, 40)  # XZ section (ky = 0)
    assert f_res.translate[1] > f_raw.translate[1]  # side by side
    assert w.progress_bar.value == w.progress_bar.max > 0

    w.layer.value = raw
    w.n_samples.value = 3
    _run_job(w, "sample")
    samples = viewer.layers["tomo samples"]
    assert samples.data.shape == (3, 24, 32, 40) and samples.ndim == 4
    np.testing.assert_allclose(samples.scale, [1, 10, 10, 10])
    assert viewer.dims.nsteps[0] == 3
    std = viewer.layers["tomo std"]
    assert std.colormap.name == "magma" and std.blending == "additive"
    lo, hi = std.contrast_limits
    assert np.isfinite([lo, hi]).all() and lo < hi
    assert "tomo mean" in viewer.layers

    # 3D rendering of the restoration
    for layer in viewer.layers:
        layer.visible = layer is restored
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    img = viewer.screenshot(canvas_only=True)
    assert img.ndim == 3 and _rendered(img)


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_widget_errors_become_notifications(viewer, tomo_mrc, tiny_model_path,
                                            tmp_path, monkeypatch):
    import cryowae.plugins._widget as widget_mod

    errors = []
    monkeypatch.setattr(widget_mod, "show_error", lambda msg: errors.append(str(msg)))
    viewer.open(str(tomo_mrc), plugin="cryowae")
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"this is not a checkpoint")
    w = _widget(viewer, bad)
    _run_job(w, "restore")
    assert len(errors) == 1 and "not a readable cryowae checkpoint" in errors[0]
    assert "tomo restored" not in viewer.layers

    w.checkpoint.value = tiny_model_path  # a volume thinner than the network's minimum
    viewer.add_image(np.zeros((2, 32, 32), np.float32), name="thin")
    w.layer.value = viewer.layers["thin"]
    _run_job(w, "restore")
    assert len(errors) == 2 and "smaller than the restorer's minimum" in errors[1]

    w.layer.value = None  # nothing chosen: refused before any thread starts
    assert w.start("restore") is None and "choose a tomogram layer" in errors[2]


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_widget_cancel_stops_the_job(viewer, tomo_mrc, tiny_model_path, monkeypatch):
    import cryowae.plugins._widget as widget_mod

    infos = []
    monkeypatch.setattr(widget_mod, "show_info", lambda msg: infos.append(str(msg)))
    viewer.open(str(tomo_mrc), plugin="cryowae")
    w = _widget(viewer, tiny_model_path)
    w.n_samples.value = 50
    w.sample_button.native.click()
    w.cancel_button.native.click()
    assert w.reporter.cancelled
    _wait_until(lambda: not w.running)
    assert any("cancelled" in m for m in infos)
    assert "tomo samples" not in viewer.layers
    assert w.restore_button.enabled and not w.cancel_button.enabled


@pytest.mark.gui
@pytest.mark.slow
@needs_napari
def test_cli_view_screenshot(virtual_display, tomo_mrc, tmp_path):
    from .conftest import run_cli

    png = tmp_path / "shot.png"
    proc = run_cli("view", tomo_mrc, "--ndisplay", "3", "--screenshot", png,
                   env=os.environ | {"DISPLAY": virtual_display})
    assert proc.returncode == 0, proc.stderr
    import imageio.v3 as iio

    assert _rendered(iio.imread(png))


@pytest.mark.slow
def test_sample_data_is_cached(tmp_path, monkeypatch):
    import cryowae.plugins._sample_data as sd

    monkeypatch.setenv("CRYOWAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sd, "SIZE", 32)  # the real one is 64; keep the test quick
    simulated_tomogram = sd.simulated_tomogram
    layers = simulated_tomogram()
    t0 = time.perf_counter()
    again = simulated_tomogram()
    assert time.perf_counter() - t0 < 1.0
    assert [kw["name"] for _, kw, _ in layers] == [kw["name"] for _, kw, _ in again]
    names = [kw["name"] for _, kw, _ in layers]
    assert any("ground truth" in n for n in names) and len(layers) == 2
    for data, kw, _ in layers:
        assert isinstance(data, np.memmap) and data.ndim == 3
        assert kw["scale"][0] > 0
