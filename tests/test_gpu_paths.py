"""Device presets, mixed precision, torch.compile fallback and overlapped tile I/O.

The CPU tests run everywhere. The ``cuda``-marked tests need a CUDA GPU and skip
without one (``pytest -m cuda``; `benchmarks/gpu_check.sh` runs them); none of them has
been run on a GPU yet, so their tolerances are first guesses to be checked there.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import cryowae.precision as precision
from cryowae.devices import preset_for
from cryowae.errors import CryowaeInputError
from cryowae.io import read_volume
from cryowae.models.checkpoint import load_restorer
from cryowae.models.protocol import ModelOnDevice
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.precision import CompileFallback, ComputeSettings, amp_note, compiled
from cryowae.progress import Cancelled
from cryowae.tiling import TileSettings, run_tiles
from cryowae.tiling.runner import model_tile_fn, resolve_batch_size

from .conftest import cancel_after, invoke_cli, write_smooth_tomogram

HAS_CUDA = torch.cuda.is_available()

TINY_TRAIN = ["--patch-size", "16", "--batch-size", "2", "--steps", "2", "--divergence",
              "none", "--no-family", "--tilt-min", "-60", "--tilt-max", "60"]


def _random_restorer(device: str = "cpu", seed: int = 0) -> ModelOnDevice:
    """A small restorer with a random (non-zero) head, so it is not the identity."""
    torch.manual_seed(seed)
    model = WAERestorer(RestorerConfig(4, 2, 8)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return ModelOnDevice(model.to(device), torch.device(device))


def _volume(shape=(40, 52, 60), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, size=shape).astype(np.float32)


def _restore(fn, data, plan, *, prefetch, device="cpu", core=None, channels=1, **kw):
    nz = data.shape[0] if core is None else core[0][1] - core[0][0]
    out = np.zeros(((channels,) if channels > 1 else ()) + (nz, *data.shape[1:]),
                   np.float32)
    origin = (0, 0, 0) if core is None else (core[0][0], 0, 0)

    def sink(where, block):
        z = slice(where[0].start - origin[0], where[0].stop - origin[0])
        out[(Ellipsis, z, where[1], where[2])] = block

    run_tiles(fn, data, plan, sink, norm=(3.0, 2.0), device=device, batch_size=3,
              core=core, channels=channels, prefetch=prefetch, **kw)
    return out


@pytest.fixture()
def tomo(tmp_path) -> Path:
    return write_smooth_tomogram(tmp_path)


@pytest.fixture()
def random_model_path(tmp_path) -> Path:
    from cryowae.models.checkpoint import save_restorer
    from cryowae.training.config import TrainConfig

    r = _random_restorer()
    cfg = TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, 8))
    path = tmp_path / "model.pt"
    save_restorer(path, r.model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(16, 8))
    return path


# --------------------------------------------------------------------------- presets

def test_preset_is_chosen_by_device():
    assert preset_for(torch.device("cpu")) == "cpu-small"
    assert preset_for(torch.device("cuda")) == "gpu-default"
    assert preset_for("cuda:1") == "gpu-default"


@pytest.mark.slow  # 3.2 s: a CLI training run
def test_train_without_config_uses_the_device_preset_and_says_so(tomo, tmp_path):
    run = tmp_path / "run"
    res = invoke_cli("train", tomo, "--out", run, "--device", "cpu", *TINY_TRAIN)
    assert res.returncode == 0, res.stderr
    assert "no --config: using preset cpu-small (device cpu)" in res.stderr
    # the preset's architecture (channels 12, depth 3) is what was trained
    cfg = load_restorer(run).train_config
    assert (cfg["restorer"]["channels"], cfg["restorer"]["depth"]) == (12, 3)


# --------------------------------------------------------------------------- amp on CPU

@pytest.mark.slow  # 3.7 s: a CLI training run
def test_amp_is_ignored_on_cpu_with_one_line(tomo, tmp_path, random_model_path):
    """On a CPU without bf16 instructions (tests/test_cpu_amp.py covers one with them)."""
    if precision.cpu_has_bf16():
        pytest.skip("this CPU runs --amp in bf16")
    assert amp_note("cpu", True).startswith("note: --amp ignored on cpu")
    assert amp_note("cpu", None) is None and amp_note("cuda", True) is None
    assert not precision.amp_active("cpu", True) and precision.amp_active("cuda", True)
    res = invoke_cli("train", tomo, "--out", tmp_path / "run", "--device", "cpu", "--amp",
                     "--config", "cpu-small", *TINY_TRAIN)
    assert res.returncode == 0, res.stderr
    assert [ln for ln in res.stderr.splitlines() if "--amp" in ln] == [
        "note: --amp ignored on cpu: this CPU has no bf16 instructions (avx512_bf16, "
        "amx_bf16); running in float32"]
    outs = []
    for extra in ([], ["--amp"]):
        out = tmp_path / f"r{len(extra)}.mrc"
        res = invoke_cli("restore", random_model_path, tomo, "--out", out, "--device", "cpu",
                         "--tile", "16", "--overlap", "4", *extra)
        assert res.returncode == 0, res.stderr
        assert ("--amp ignored on cpu" in res.stderr) == bool(extra)
        outs.append(read_volume(out).numpy())
    assert np.array_equal(*outs)


@pytest.mark.slow  # 6.8 s: bf16 training and restore on CPU
def test_bf16_paths_run_and_stay_close_to_float32(monkeypatch, tomo, tmp_path):
    """The bf16 training step (mean path, latent bank, family branch) and the bf16 tile
    function, exercised by turning on CPU bf16 autocast: dtypes must meet (the branch
    and the latent head take float32) and the numbers stay near float32's."""
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    def steps(amp_devices: frozenset[str], name: str) -> list[dict]:
        monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", amp_devices)
        cfg = TrainConfig.from_dict(dict(
            patch_size=16, channels=4, depth=2, latent_dim=8, batch_size=2, bank_size=64,
            steps=3, lr=2e-3, check_prior_preference=False, device="cpu", seed=1,
            family={"branch_every": 1}))  # the branch on every step compared
        tr = Trainer(load_sources([tomo], [], [], min_size=16), cfg, tmp_path / name)
        assert tr.family is not None
        return [tr.train_step() for _ in range(3)]

    f32 = steps(frozenset({"cuda"}), "f32")
    b16 = steps(frozenset({"cuda", "cpu"}), "b16")
    for a, b in zip(f32, b16, strict=True):
        assert all(np.isfinite([b["rec"], b["loss"], b["fam_loss"]]))
        assert abs(a["rec"] - b["rec"]) < 0.02 * abs(a["rec"])
        assert abs(a["fam_loss"] - b["fam_loss"]) < 0.02 * abs(a["fam_loss"])
    # the head starts at zero and the low-pass skip runs in float32, so bf16 shows
    # once the head has learnt
    assert f32[2]["rec"] != b16[2]["rec"]  # bf16 did run

    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda"}))
    r = _random_restorer()
    data = _volume()
    plan = TileSettings(16, 4).plan(data.shape, 4)
    ref = _restore(model_tile_fn(r), data, plan, prefetch=0)
    monkeypatch.setattr(precision, "BF16_AUTOCAST_DEVICES", frozenset({"cuda", "cpu"}))
    low = _restore(model_tile_fn(r), data, plan, prefetch=0)
    rel = np.sqrt(np.mean((low - ref) ** 2)) / ref.std()
    assert 0 < rel < 0.02, rel


# --------------------------------------------------------------------------- compile

@pytest.mark.slow  # 3.1 s: torch.compile attempts
def test_compile_failures_fall_back_with_one_line():
    r = _random_restorer()
    x = torch.from_numpy(_volume((2, 16, 16, 16)))[:, None]
    with torch.inference_mode():
        want = r.model(x)[0]
        msgs: list[str] = []
        # an unknown backend fails when wrapping
        m = compiled(r.model, "no_such_backend", msgs.append)
        assert torch.equal(m(x)[0], want) and m.failed
        assert len(msgs) == 1 and msgs[0].startswith(
            "warning: torch.compile (backend no_such_backend) failed: Invalid backend")

        # a backend that raises fails at the first call
        def refusing_backend(gm, example_inputs):
            raise RuntimeError("this backend refuses")

        msgs.clear()
        m = compiled(r.model, refusing_backend, msgs.append)
        assert not m.failed
        assert torch.equal(m(x)[0], want) and m.failed
        assert torch.equal(m(x)[0], want)
        assert len(msgs) == 1 and "this backend refuses" in msgs[0]
        assert msgs[0].endswith("running eagerly")


@pytest.mark.slow
def test_compile_keeps_out_of_memory_errors_for_the_engine():
    class Oom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    msgs: list[str] = []
    m = compiled(Oom(), "eager", msgs.append)
    with pytest.raises(RuntimeError, match="out of memory"):
        m(torch.zeros(2))
    assert isinstance(m, CompileFallback) and not msgs


@pytest.mark.slow  # 4.8 s: torch.compile of the restorer
def test_cli_restore_compile_paths(tomo, tmp_path, random_model_path):
    base = ["restore", random_model_path, tomo, "--device", "cpu", "--tile", "16",
            "--overlap", "4"]
    res = invoke_cli(*base, "--out", tmp_path / "plain.mrc", check=True)
    plain = read_volume(tmp_path / "plain.mrc").numpy()
    res = invoke_cli(*base, "--out", tmp_path / "bad.mrc", "--compile", "--compile-backend",
                     "no_such_backend")
    assert res.returncode == 0, res.stderr
    warn = [ln for ln in res.stderr.splitlines() if "torch.compile" in ln]
    assert len(warn) == 1 and warn[0].endswith("running eagerly"), res.stderr
    assert np.array_equal(read_volume(tmp_path / "bad.mrc").numpy(), plain)
    # a working backend (dynamo tracing, no code generation) gives the same numbers
    res = invoke_cli(*base, "--out", tmp_path / "eager.mrc", "--compile",
                     "--compile-backend", "eager", check=True)
    assert "torch.compile" not in res.stderr
    assert np.abs(read_volume(tmp_path / "eager.mrc").numpy() - plain).max() < 1e-6


@pytest.mark.slow  # 3.8 s: torch.compile of a training step
def test_training_with_compile(tomo, tmp_path):
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    def recs(name: str, **kw) -> tuple[list[float], list[str]]:
        from cryowae.progress import ProgressReporter

        logged: list[str] = []

        class Log(ProgressReporter):
            def log(self, message: str) -> None:
                logged.append(message)

        cfg = TrainConfig.from_dict(dict(
            patch_size=16, channels=4, depth=2, latent_dim=8, batch_size=2, bank_size=64,
            steps=2, lr=2e-3, check_prior_preference=False, device="cpu", seed=1) | kw)
        tr = Trainer(load_sources([tomo], [], [], min_size=16), cfg, tmp_path / name,
                     progress=Log())
        return [tr.train_step()["rec"] for _ in range(2)], logged

    eager, _ = recs("eager", family=False)
    comp, logged = recs("comp", family=False, compile=True, compile_backend="eager")
    assert not logged
    np.testing.assert_allclose(comp, eager, rtol=1e-5)
    bad, logged = recs("bad", family=False, compile=True, compile_backend="nope")
    assert bad == eager and len(logged) == 1 and "running eagerly" in logged[0]
    # the family branch reads the decoder's features from its forward's output (no
    # hooks), so it compiles along
    fam, logged = recs("fam", compile=True, compile_backend="eager")
    assert not logged and np.isfinite(fam).all()


# --------------------------------------------------------------------------- prefetch

@pytest.mark.slow  # 2 s per case on one worker
@pytest.mark.parametrize("core, channels", [(None, 1), (((8, 30), (0, 52), (0, 60)), 1),
                                            (None, 2)])
def test_prefetching_is_bit_identical_to_the_plain_loop(core, channels):
    r = _random_restorer()
    data = _volume()
    plan = TileSettings(16, 5).plan(data.shape, 4)
    base = model_tile_fn(r)

    def fn(x, refs):  # C channels: the restoration and a multiple of it
        y = base(x, refs)[0]
        return y if channels == 1 else torch.cat([y, 0.5 * y], 1)

    plain = _restore(fn, data, plan, prefetch=0, core=core, channels=channels)
    for depth in (1, 3):
        got = _restore(fn, data, plan, prefetch=depth, core=core, channels=channels)
        assert np.array_equal(got, plain)
    assert np.abs(plain).max() > 0


def test_prefetching_reads_and_writes_in_their_own_threads():
    data = _volume((30, 20, 20))
    plan = TileSettings(12, 4).plan(data.shape, 4)
    seen: dict[str, set[str]] = {"read": set(), "fn": set(), "write": set()}

    class Source:
        shape, dtype = data.shape, data.dtype

        def __getitem__(self, key):
            seen["read"].add(threading.current_thread().name)
            return data[key]

    def fn(x, refs):
        seen["fn"].add(threading.current_thread().name)
        return x

    def sink(where, block):
        seen["write"].add(threading.current_thread().name)

    run_tiles(fn, Source(), plan, sink, norm=(0.0, 1.0), device="cpu", batch_size=2)
    main = threading.current_thread().name
    assert seen["fn"] == {main}
    assert seen["read"] == {"cryowae-reader"}
    assert len(seen["write"]) == 1 and next(iter(seen["write"])).startswith("cryowae-writer")
    seen = {k: set() for k in seen}
    run_tiles(fn, Source(), plan, sink, norm=(0.0, 1.0), device="cpu", batch_size=2,
              prefetch=0)
    assert seen["read"] == seen["fn"] == seen["write"] == {main}


def test_prefetching_stops_its_threads_on_cancel_and_errors():
    data = _volume((60, 24, 24))
    plan = TileSettings(12, 4).plan(data.shape, 4)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(Cancelled):
        run_tiles(lambda x, refs: x, data, plan, lambda w, b: None, norm=(0.0, 1.0),
                  device="cpu", batch_size=1, progress=cancel_after(3))
    bad = data.copy()
    bad[40, 3, 3] = np.nan
    written: list[int] = []
    with pytest.raises(CryowaeInputError, match="NaN or infinite voxels in slices"):
        run_tiles(lambda x, refs: x, bad, plan, lambda w, b: written.append(w[0].stop),
                  norm=(0.0, 1.0), device="cpu", batch_size=4, check_finite=True)
    assert written and max(written) <= 40  # what came before the bad slab was written

    def failing_sink(where, block):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_tiles(lambda x, refs: x, data, plan, failing_sink, norm=(0.0, 1.0),
                  device="cpu", batch_size=4)
    left = {t.name for t in threading.enumerate()} - before
    assert not {n for n in left if n.startswith("cryowae-")}, left


def test_batch_size_on_cpu_is_the_given_or_default():
    fn = model_tile_fn(_random_restorer())
    assert resolve_batch_size(fn, (16, 16, 16), "cpu", 7) == 7
    assert resolve_batch_size(fn, (16, 16, 16), "cpu", None) == 4


# The memory bound of the prefetching engine: restore and sampling run it by default
# (prefetch=2), so tests/test_restore.py and tests/test_sampling.py measure their peak-RSS
# growth on memory-mapped inputs larger than the bound through this path.


# --------------------------------------------------------------------------- CUDA

def _cuda_steps(tomo: Path, tmp_path: Path, amp: bool, channels_last: bool = False):
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    cfg = TrainConfig.from_dict(dict(
        patch_size=16, channels=4, depth=2, latent_dim=8, batch_size=2, bank_size=64,
        steps=3, lr=2e-3, check_prior_preference=False, device="cuda", seed=1, amp=amp,
        channels_last=channels_last, family={"branch_every": 1}))
    tr = Trainer(load_sources([tomo], [], [], min_size=16), cfg,
                 tmp_path / f"cuda_{amp}_{channels_last}")
    return [tr.train_step() for _ in range(3)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_training_steps_bf16_near_fp32(tomo, tmp_path):
    f32 = _cuda_steps(tomo, tmp_path, False)
    b16 = _cuda_steps(tomo, tmp_path, True)
    cl = _cuda_steps(tomo, tmp_path, True, channels_last=True)
    for a, b, c in zip(f32, b16, cl, strict=True):
        assert all(np.isfinite([b["rec"], b["loss"], b["fam_loss"], c["rec"]]))
        assert abs(a["rec"] - b["rec"]) < 0.05 * abs(a["rec"])
        assert abs(b["rec"] - c["rec"]) < 0.05 * abs(b["rec"])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_restore_matches_cpu_and_bf16_matches_fp32():
    data = _volume((48, 64, 72))
    plan = TileSettings(32, 8).plan(data.shape, 4)
    cpu = _restore(model_tile_fn(_random_restorer("cpu")), data, plan, prefetch=0)
    gpu = _random_restorer("cuda")
    f32 = _restore(model_tile_fn(gpu, ComputeSettings(amp=False)), data, plan, prefetch=2,
                   device="cuda")
    b16 = _restore(model_tile_fn(gpu), data, plan, prefetch=2, device="cuda")
    cl = _restore(model_tile_fn(gpu, ComputeSettings(channels_last=True)), data, plan,
                  prefetch=2, device="cuda")
    plain = _restore(model_tile_fn(gpu), data, plan, prefetch=0, device="cuda")
    scale = cpu.std()
    assert np.abs(f32 - cpu).max() < 1e-2 * scale  # TF32 convolutions allowed
    assert np.sqrt(np.mean((b16 - f32) ** 2)) < 2e-2 * scale
    assert np.sqrt(np.mean((cl - b16) ** 2)) < 2e-2 * scale
    assert np.array_equal(plain, b16)  # pinned prefetching changes nothing


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_batch_size_from_free_memory_and_compile():
    r = _random_restorer("cuda")
    fn = model_tile_fn(r)
    msgs: list[str] = []
    b = resolve_batch_size(fn, (64, 64, 64), "cuda", None, msgs.append)
    assert 1 <= b <= 64 and len(msgs) == 1 and msgs[0].startswith(f"batch size {b} from")
    data = _volume((40, 48, 48))
    plan = TileSettings(32, 8).plan(data.shape, 4)
    eager = _restore(fn, data, plan, prefetch=2, device="cuda")
    msgs.clear()
    comp = _restore(model_tile_fn(r, ComputeSettings(compile=True), msgs.append), data, plan,
                    prefetch=2, device="cuda")
    assert not msgs, msgs  # inductor compiled
    assert np.sqrt(np.mean((comp - eager) ** 2)) < 2e-2 * eager.std()


DDP_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    from cryowae.models.restorer import RestorerConfig, WAERestorer
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    m = WAERestorer(RestorerConfig(4, 2, 8)).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(m, device_ids=[0])
    x = torch.randn(2, 1, 16, 16, 16, device="cuda")
    ddp(x)[0].square().mean().backward()
    g = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    m.zero_grad()
    m(x)[0].square().mean().backward()
    h = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(g) == len(h) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g, h))
    dist.destroy_process_group()
    print("ok")
""")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_ddp_with_nccl(tomo, tmp_path):
    """NCCL DDP gradients equal the plain ones on one GPU; with two or more GPUs,
    `cryowae train` under torchrun, one process per GPU."""
    proc = subprocess.run([sys.executable, "-c", DDP_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    n = torch.cuda.device_count()
    if n < 2:
        return
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "ddp"
    proc = subprocess.run([str(torchrun), "--nproc-per-node", str(n), "--master-port",
                           "29533", "-m", "cryowae", "train", str(tomo), "--out", str(run),
                           "--device", "cuda", *TINY_TRAIN], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{n} process(es)" in proc.stdout + proc.stderr
    assert load_restorer(run).train_config["patch_size"] == 16
