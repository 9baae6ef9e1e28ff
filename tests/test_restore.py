"""Tiled, seam-free restoration (`cryowae.inference`) and `cryowae restore`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cryowae.errors import CryowaeInputError
from cryowae.inference.restore import (
    restore_array,
    restore_file,
    restore_halves,
    voxel_size_warning,
)
from cryowae.io import open_mrc_writer, read_mrc_header, read_ome_zarr, read_volume, write_mrc
from cryowae.io.stats import volume_stats
from cryowae.models.checkpoint import LoadedRestorer, load_restorer
from cryowae.models.protocol import ModelOnDevice
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.progress import Cancelled, ProgressReporter
from cryowae.tiling.plan import plan_tiles
from tests.conftest import MMAP_ENV, invoke_cli, run_cli

# --------------------------------------------------------------------------- helpers


def _restorer(model: nn.Module) -> ModelOnDevice:
    """The bare `Restorer` (network and device) that restoration needs."""
    return ModelOnDevice(model.eval())


class SmoothNonlinear(nn.Module):
    """x + 0.5 tanh(2 * (3x3x3 box blur of x)): local, the same at every position."""

    multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1 / 27)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x + 0.5 * torch.tanh(2 * self.conv(x)), None


class OOMAboveOne(nn.Module):
    """Wraps a model; raises a CUDA-style out-of-memory error for batches above one."""

    def __init__(self, inner: nn.Module,
                 message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> None:
        super().__init__()
        self.inner = inner
        self.multiple = inner.multiple
        self.message = message
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor):
        if x.shape[0] > 1:
            raise RuntimeError(self.message)
        self.batches.append(x.shape[0])
        return self.inner(x)


class Recorder(ProgressReporter):
    def __init__(self, cancel_after: int | None = None) -> None:
        super().__init__()
        self.messages: list[str] = []
        self.cancel_after = cancel_after

    def log(self, message: str) -> None:
        self.messages.append(message)

    def advance(self, n: int = 1, **info) -> None:
        super().advance(n, **info)
        if self.cancel_after is not None and self.done >= self.cancel_after:
            self.cancel()


def _ramp(shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    return (0.03 * z + 0.02 * y + 0.025 * x).astype(np.float32)


def _seam_ratios(out: np.ndarray, edges: list[list[int]]) -> list[float]:
    """Per axis: mean |second difference| on the planes at tile edges / elsewhere."""
    ratios = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        d2 = np.abs(np.diff(out.astype(np.float64), n=2, axis=ax)).mean(axis=other)
        n = out.shape[ax]
        near = {c for e in edges[ax] for c in (e - 1, e)}
        at = [d2[c - 1] for c in range(1, n - 1) if c in near]
        far = [d2[c - 1] for c in range(3, n - 3)
               if all(abs(c - e) > 2 for e in edges[ax])]
        ratios.append(float(np.mean(at) / np.mean(far)))
    return ratios


@pytest.fixture(scope="module")
def identity(tiny_model_path) -> LoadedRestorer:
    return load_restorer(tiny_model_path)


# --------------------------------------------------------------------------- restore_array


@pytest.mark.parametrize("shape,tile,overlap", [((37, 50, 45), 16, 8), ((5, 7, 9), 16, 8),
                                                ((12, 16, 20), 16, 4), ((1, 30, 23), 16, 8),
                                                ((24, 33, 19), 18, 6)])
def test_identity_model_returns_input(identity, shape, tile, overlap):
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    y = restore_array(identity, x, tile=tile, overlap=overlap, batch_size=3)
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.abs(y - x).max() < 1e-5


def test_identity_keeps_intensity_scale_of_int16_and_zarr(identity, tmp_path):
    import zarr

    x = np.random.default_rng(2).integers(-3000, 3000, size=(20, 26, 30)).astype(np.int16)
    z = zarr.open_array(str(tmp_path / "in.zarr"), mode="w", shape=x.shape, chunks=(8, 8, 8),
                        dtype="int16", zarr_format=2)
    z[:] = x
    out = zarr.open_array(str(tmp_path / "out.zarr"), mode="w", shape=x.shape,
                          chunks=(8, 16, 16), dtype="float32", zarr_format=2)
    got = restore_array(identity, z, tile=16, overlap=8, out=out)
    assert got is out
    np.testing.assert_allclose(np.asarray(out), x, atol=3000 * 2e-6)


def test_tile_rounded_up_and_reported(identity):
    rec = Recorder()
    x = np.random.default_rng(0).normal(size=(10, 20, 20)).astype(np.float32)
    y = restore_array(identity, x, tile=14, overlap=4, progress=rec)
    assert any("rounded up to 16" in m for m in rec.messages)
    assert rec.done == rec.total > 0
    assert np.abs(y - x).max() < 1e-5


def test_bad_parameters_are_input_errors(identity):
    x = np.zeros((8, 8, 8), np.float32)
    x[0, 0, 0] = 1
    with pytest.raises(CryowaeInputError, match="overlap"):
        restore_array(identity, x, tile=16, overlap=16)
    with pytest.raises(CryowaeInputError, match="batch"):
        restore_array(identity, x, tile=16, overlap=4, batch_size=0)
    with pytest.raises(CryowaeInputError, match="constant"):
        restore_array(identity, np.ones((8, 8, 8), np.float32), tile=16, overlap=4)


def test_no_seams_against_a_full_volume_pass():
    """A local nonlinear model gives the same result tiled as in one pass."""
    model = SmoothNonlinear()
    shape = (40, 48, 44)
    ramp = _ramp(shape)
    mean, std = float(ramp.mean()), float(ramp.std())
    with torch.no_grad():
        full = model((torch.from_numpy(ramp)[None, None] - mean) / std)[0][0, 0].numpy()
    full = full * std + mean
    plan = plan_tiles(shape, 16, 8, 4)
    edges = [plan.edges(a) for a in range(3)]
    assert all(edges)
    tiled = restore_array(_restorer(model), ramp, tile=16, overlap=8, norm=(mean, std))
    inner = (slice(2, -2),) * 3  # the full pass zero-pads at the volume's border
    assert np.abs(tiled - full)[inner].max() < 5e-3
    assert max(_seam_ratios(tiled, edges)) < 1.5
    # control: plain averaging of the same tiles does show the tile edges
    flat = restore_array(_restorer(model), ramp, tile=16, overlap=8, window="flat",
                         norm=(mean, std))
    assert np.abs(flat - full)[inner].max() > 5 * np.abs(tiled - full)[inner].max()
    assert max(_seam_ratios(flat, edges)) > 3


@pytest.mark.slow
def test_no_seams_with_a_non_identity_restorer():
    """A real WAERestorer (GroupNorm, one latent code per tile) whose head is not zero:
    each tile's output depends on the whole tile, yet the blended volume shows no more
    curvature at tile edges than inside tiles; without blending, it does."""
    torch.manual_seed(0)
    model = WAERestorer(RestorerConfig(channels=4, depth=2, latent_dim=8))
    nn.init.normal_(model.head.weight, std=0.3)
    nn.init.normal_(model.head.bias, std=0.1)
    shape = (40, 48, 44)
    ramp = _ramp(shape)
    r = _restorer(model)
    out = restore_array(r, ramp, tile=16, overlap=8)
    assert np.abs(out - ramp).max() > 0.05  # really not the identity
    edges = [plan_tiles(shape, 16, 0, 4).edges(a) for a in range(3)]
    blended = _seam_ratios(out, [plan_tiles(shape, 16, 8, 4).edges(a) for a in range(3)])
    assert max(blended) < 1.3
    butted = _seam_ratios(restore_array(r, ramp, tile=16, overlap=0, window="flat"), edges)
    assert max(butted) > 1.5


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 7247757312 bytes"])
def test_oom_fallback_halves_batch(identity, message):
    rec = Recorder()
    wrapped = OOMAboveOne(identity.model, message)
    r = ModelOnDevice(wrapped)
    x = np.random.default_rng(3).normal(size=(12, 24, 36)).astype(np.float32)
    y = restore_array(r, x, tile=16, overlap=8, batch_size=4, progress=rec)
    assert np.abs(y - x).max() < 1e-5
    assert set(wrapped.batches) == {1}
    falls = [m for m in rec.messages if "fell back to batch" in m]
    assert falls == ["out of memory with batch 4: fell back to batch 2",
                     "out of memory with batch 2: fell back to batch 1"]


def test_oom_with_one_tile_is_one_clear_error(identity):
    class AlwaysOOM(nn.Module):
        multiple = 4

        def forward(self, x):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(CryowaeInputError, match="smaller --tile"):
        restore_array(_restorer(AlwaysOOM()), np.random.rand(8, 8, 8).astype(np.float32),
                      tile=8, overlap=2, batch_size=2)


def test_non_oom_errors_propagate(identity):
    class Broken(nn.Module):
        multiple = 4

        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        restore_array(_restorer(Broken()), np.random.rand(8, 8, 8).astype(np.float32),
                      tile=8, overlap=2)


def test_cancel_stops(identity):
    x = np.random.default_rng(4).normal(size=(40, 40, 40)).astype(np.float32)
    with pytest.raises(Cancelled, match="restoration cancelled"):
        restore_array(identity, x, tile=16, overlap=8, progress=Recorder(cancel_after=2))


def test_restore_halves_identity_averages_normalised_halves(identity):
    rng = np.random.default_rng(5)
    even = rng.normal(1.0, 2.0, size=(18, 30, 26)).astype(np.float32)
    odd = rng.normal(-1.0, 0.5, size=(18, 30, 26)).astype(np.float32)
    ne = (float(even.mean()), float(even.std()))
    no = (float(odd.mean()), float(odd.std()))
    got = restore_halves(identity, even, odd, tile=16, overlap=8, norms=(ne, no),
                         out_norm=(10.0, 3.0))
    want = ((even - ne[0]) / ne[1] + (odd - no[0]) / no[1]) / 2 * 3.0 + 10.0
    assert np.abs(got - want).max() < 1e-4
    with pytest.raises(CryowaeInputError, match="shape"):
        restore_halves(identity, even, odd[:-1])


def test_voxel_size_warning_text():
    assert voxel_size_warning(8.5, 8.0) is None
    msg = voxel_size_warning(13.2, 8.0)
    assert "voxel size 13.2 A differs from the training data's 8.0 A by 65%" in msg


# --------------------------------------------------------------------------- memory

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from cryowae.inference.restore import restore_array
    from cryowae.io import open_mrc_writer, read_volume
    from cryowae.models.checkpoint import load_restorer

    model, src, dst = sys.argv[1:4]
    r = load_restorer(model)
    kw = dict(tile=48, overlap=8, batch_size=2)
    # the network's working set for one batch of tiles is a fixed cost: pay it first
    restore_array(r, np.random.default_rng(0).normal(size=(60, 96, 96)).astype(np.float32),
                  **kw)
    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    with read_volume(src) as vol, open_mrc_writer(dst, vol.shape, vol.voxel_size,
                                                  overwrite=True) as out:
        base = peak()
        restore_array(r, vol.data, out=out, **kw)
        during = peak()
    print(json.dumps({"base": base, "during": during}))
""")

#: peak RSS growth allowed while restoring the 16 MiB memory-mapped volume below, three
#: quarters of it. The engine (prefetching by default: a reader thread a few batches of tiles
#: ahead, a writer thread one slab behind) keeps slab buffers (48 x 128 x 128 float32,
#: 3.1 MB each), one slab of input pages and a few batches of tiles; measured growth: 0 MB
#: at 1024 x 128 x 128 (the warm-up's network working set is the larger peak).
#: 256x256x256 measured 24.5 MB (a 12.6 MB buffer): the growth follows the slab, not the
#: volume.
MEMORY_BOUND = 12 << 20


@pytest.mark.slow
def test_memory_bounded_on_memory_mapped_volume(tiny_model_path, tmp_path):
    """Peak RSS (VmHWM) grows by less than MEMORY_BOUND, 3/4 of the 16 MiB input,
    while restoring a memory-mapped MRC into a memory-mapped MRC (in a fresh process)."""
    shape = (256, 128, 128)  # 16 MiB of float32, 7 rows of tiles
    src, dst = tmp_path / "big.mrc", tmp_path / "big_out.mrc"
    with open_mrc_writer(src, shape, 10.0) as mm:
        rng = np.random.default_rng(0)
        for z in range(0, shape[0], 16):
            mm[z:z + 16] = rng.normal(size=(16, *shape[1:])).astype(np.float32)
    nbytes = int(np.prod(shape)) * 4
    assert nbytes > 1.25 * MEMORY_BOUND
    # a fixed mmap threshold makes glibc hand freed network temporaries back at once, so
    # the peak shows what the engine keeps alive rather than allocator slack
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tiny_model_path),
                           str(src), str(dst)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["during"] - m["base"]
    print(f"peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < MEMORY_BOUND, f"peak RSS grew by {growth / 1e6:.1f} MB"
    with read_volume(src) as a, read_volume(dst) as b:
        for z in (0, 77, 255):
            assert np.abs(np.asarray(a.data[z]) - np.asarray(b.data[z])).max() < 1e-5


# --------------------------------------------------------------------------- files and CLI


@pytest.fixture()
def tomo(tmp_path) -> Path:
    x = np.random.default_rng(6).normal(5.0, 2.0, size=(20, 40, 36)).astype(np.float32)
    path = tmp_path / "tomo.mrc"
    write_mrc(path, x, voxel_size=10.5, origin=(1.0, 2.0, 3.0))
    return path


def _read(path: Path) -> np.ndarray:
    with read_volume(path) as vol:
        return vol.numpy()


def test_restore_file_is_atomic_on_cancel(tiny_model_path, tomo, tmp_path):
    out = tmp_path / "out.mrc"
    with pytest.raises(Cancelled):
        restore_file(tiny_model_path, tomo, out, tile=16, overlap=8,
                     progress=Recorder(cancel_after=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tomo.mrc"]


@pytest.mark.slow
def test_restore_file_halves(tiny_model_path, tomo, tmp_path):
    x = _read(tomo)
    rng = np.random.default_rng(7)
    even, odd = tmp_path / "even.mrc", tmp_path / "odd.mrc"
    write_mrc(even, x + rng.normal(size=x.shape).astype(np.float32), 10.5)
    write_mrc(odd, x + rng.normal(size=x.shape).astype(np.float32), 10.5)
    out = restore_file(tiny_model_path, tomo, tmp_path / "avg.mrc", even=even, odd=odd,
                       tile=16, overlap=8, halves="average")
    y = _read(out)
    e, o = _read(even), _read(odd)
    (me, se), (mo, so), (mx, sx) = (volume_stats(v) for v in (e, o, x))
    want = ((e - me) / se + (o - mo) / so) / 2 * sx + mx  # on the full tomogram's scale
    assert np.abs(y - want).max() < 1e-4
    rec = Recorder()  # default: one pass on the full tomogram (measured; see restore.py)
    out = restore_file(tiny_model_path, tomo, tmp_path / "full.mrc", even=even, odd=odd,
                       tile=16, overlap=8, progress=rec)
    assert np.abs(_read(out) - x).max() < 1e-5
    assert any("one pass" in m for m in rec.messages)
    with pytest.raises(CryowaeInputError, match="both"):
        restore_file(tiny_model_path, tomo, tmp_path / "x.mrc", even=even)


def test_restore_file_closes_its_files(tiny_model_path, tomo, tmp_path):
    """No file under tmp_path stays open (or mapped) after restore_file: inputs, halves
    and output are closed (Linux /proc)."""
    even = write_mrc(tmp_path / "even.mrc", _read(tomo), 10.5)

    def held() -> set[str]:
        fds = {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")}
        maps = {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines()
                if len(ln.split()) >= 6}
        return {f for f in fds | maps if f.startswith(str(tmp_path))}

    restore_file(tiny_model_path, tomo, tmp_path / "o.mrc", even=even, odd=even,
                 tile=16, overlap=8, halves="full")
    assert held() == set()
    vol = read_volume(tomo)  # the check itself sees an open memory map
    assert held()
    vol.close()


@pytest.mark.slow
def test_cli_restore_mrc_keeps_voxel_size_and_origin(tiny_model_path, tomo, tmp_path):
    """A real `cryowae restore` process (the entry point, the exit code, the output)."""
    out = tmp_path / "restored.mrc"
    proc = run_cli("restore", tiny_model_path, tomo, "--out", out, "--tile", "16",
                   "--overlap", "8", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "voxel" in proc.stdout
    h = read_mrc_header(out)
    assert h["voxel_size"] == pytest.approx(10.5, rel=1e-4)
    assert h["origin"] == pytest.approx((1.0, 2.0, 3.0))
    assert np.abs(_read(out) - _read(tomo)).max() < 1e-5
    assert "differs from the training data" not in proc.stderr  # 10.5 vs 10: within 10%


def test_cli_restore_zarr(tiny_model_path, tomo, tmp_path):
    out = tmp_path / "restored.zarr"
    res = invoke_cli("restore", tiny_model_path.parent, tomo, "--out", out, "--tile", "16",
                     "--overlap", "8")
    assert res.returncode == 0, res.stderr
    vol = read_ome_zarr(out)
    assert vol.shape == (20, 40, 36) and vol.voxel_size == pytest.approx(10.5)
    assert np.abs(np.asarray(vol.data) - _read(tomo)).max() < 1e-5


def test_cli_refuses_existing_output(tiny_model_path, tomo, tmp_path):
    out = tmp_path / "exists.mrc"
    out.write_bytes(b"keep me")
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", out, "--tile", "16",
                     "--overlap", "8")
    assert res.returncode == 2
    assert "--overwrite" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", out, "--tile", "16",
                     "--overlap", "8", "--overwrite")
    assert res.returncode == 0, res.stderr
    with read_volume(out) as vol:
        assert vol.shape == (20, 40, 36)


@pytest.mark.parametrize("args,needle", [
    (["--tile", "32", "--overlap", "40"], "--overlap 40 must be smaller than the tile (32)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--halves", "both"], "unknown halves mode"),
])
def test_cli_bad_tile_options_are_one_line(tiny_model_path, tomo, tmp_path, args, needle):
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", tmp_path / "o.mrc", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "o.mrc").exists()


def test_cli_non_checkpoint_model(tomo, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("not a model")
    res = invoke_cli("restore", bogus, tomo, "--out", tmp_path / "o.mrc")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint" in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o.mrc").exists()


def test_cli_warns_on_voxel_size_mismatch(tiny_model_path, tmp_path):
    x = np.random.default_rng(8).normal(size=(12, 20, 20)).astype(np.float32)
    path = tmp_path / "binned.mrc"
    write_mrc(path, x, voxel_size=13.2)
    res = invoke_cli("restore", tiny_model_path, path, "--out", tmp_path / "o.mrc",
                     "--tile", "16", "--overlap", "8")
    assert res.returncode == 0, res.stderr
    assert "voxel size 13.2 A differs from the training data's 10.0 A by 32%" in res.stderr


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_cli_nan_input_and_bad_suffix(tiny_model_path, tmp_path):
    x = np.random.default_rng(9).normal(size=(12, 20, 20)).astype(np.float32)
    x[3, 4, 5] = np.nan
    path = tmp_path / "nan.mrc"
    write_mrc(path, x, voxel_size=10.0)
    res = invoke_cli("restore", tiny_model_path, path, "--out", tmp_path / "o.mrc")
    assert res.returncode == 2 and "NaN" in res.stderr
    res = invoke_cli("restore", tiny_model_path, path, "--out", tmp_path / "o.tif")
    assert res.returncode == 2 and ".zarr" in res.stderr


@pytest.mark.slow
def test_cli_restore_simulated_halves(tiny_model_path, tmp_path, small_sim):
    out = tmp_path / "sim_restored.mrc"
    res = invoke_cli("restore", tiny_model_path, small_sim / "tomo.mrc", "--even",
                     small_sim / "tomo_even.mrc", "--odd", small_sim / "tomo_odd.mrc", "--out",
                     out, "--tile", "16", "--overlap", "8")
    assert res.returncode == 0, res.stderr
    y = _read(out)
    assert y.shape == _read(small_sim / "tomo.mrc").shape and np.all(np.isfinite(y))


@pytest.mark.slow
def test_cli_restore_reads_tlt_and_warns_on_another_geometry(tiny_model_path, tomo, tmp_path):
    """The tiny model was trained on -60..60 about Y: a .tlt next to the tomogram with
    another range is read and reported; one that matches, or --tilt-file with the
    training range, gives no warning."""
    from cryowae.io.tilts import write_tilt_angles

    write_tilt_angles(tomo.with_suffix(".tlt"), np.arange(-42.0, 43.0, 3.0))
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", tmp_path / "a.mrc",
                     "--tile", "16", "--overlap", "8")
    assert res.returncode == 0, res.stderr
    assert "-42..42" in res.stderr and "differs from the model's training range" in res.stderr
    same = tmp_path / "same.tlt"
    write_tilt_angles(same, np.arange(-60.0, 61.0, 3.0))
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", tmp_path / "b.mrc",
                     "--tile", "16", "--overlap", "8", "--tilt-file", same)
    assert res.returncode == 0, res.stderr
    assert "training range" not in res.stderr
    res = invoke_cli("restore", tiny_model_path, tomo, "--out", tmp_path / "c.mrc",
                     "--tile", "16", "--overlap", "8", "--tilt-axis", "x")
    assert res.returncode == 0 and "about X" in res.stderr
