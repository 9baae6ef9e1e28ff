"""Training: config, determinism, loss decrease, gradient balancing, resume, DDP, lambda
scale-freedom, cancellation, bad input."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.models.checkpoint import KIND_CHECKPOINT, load_restorer, load_state
from cryowae.physics.geometry import TiltGeometry
from cryowae.progress import Cancelled
from cryowae.training.config import TrainConfig, load_config, save_config
from cryowae.training.data import load_sources
from cryowae.training.loop import Trainer

from .conftest import cancel_after, invoke_cli

TINY = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 1, "checkpoint_every": 2, "steps": 6, "lr": 2e-3,
        "check_prior_preference": False,
        # these tests exercise the latent penalty, which is off by default
        "divergence": "mmd",
        # the mean path's tests: the family branch has its own (test_family_training.py)
        "family": False}


def _smooth_volume(shape=(24, 32, 32), seed=0, scale=1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    v = torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2)[0, 0].numpy()
    return (scale * (v * 5 + 0.2 * rng.normal(size=shape))).astype(np.float32)


@pytest.fixture()
def tomo(tmp_path) -> Path:
    p = tmp_path / "tomo.mrc"
    write_mrc(p, _smooth_volume(), 10.0)
    return p


@pytest.fixture()
def tiny_config(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump({"train": TINY}))
    return p


def test_presets_load_and_validate():
    for name in ("cpu-small", "gpu-default", "gpu-large"):
        cfg = load_config(name)
        assert cfg.patch_size % 2**cfg.restorer.depth == 0
    small = load_config("cpu-small")
    assert load_config(None) == small
    assert (small.patch_size, small.restorer.channels, small.restorer.latent_dim) == (48, 12, 32)
    with pytest.raises(CryowaeInputError, match="unknown setting"):
        TrainConfig.from_dict({"patchsize": 3})
    with pytest.raises(CryowaeInputError, match="divergence"):
        TrainConfig().replace(divergence="kl")


def test_config_reads_nested_and_old_flat_forms(tmp_path):
    """The nested form (restorer/geometry) and the flat keys of older files give the same
    config; a key given both ways must agree; geometry is validated when made."""
    flat = {"patch_size": 32, "channels": 6, "depth": 2, "latent_dim": 16, "skip": "identity",
            "tilt_min": -50, "tilt_max": 40, "tilt_axis": "X", "lr": 0.003}
    nested = {"patch_size": 32, "lr": 0.003,
              "restorer": {"channels": 6, "depth": 2, "latent_dim": 16, "skip": "identity"},
              "geometry": {"tilt_min": -50, "tilt_max": 40, "axis": "x"}}
    a, b = TrainConfig.from_dict(flat), TrainConfig.from_dict(nested)
    assert a == b
    assert a.restorer.channels == 6 and a.restorer.skip == "identity"
    assert a.geometry.tilt_range == (-50.0, 40.0) and a.geometry.axis == "x"
    # round trip through YAML, nested on disk
    save_config(a, tmp_path / "c.yaml")
    on_disk = yaml.safe_load((tmp_path / "c.yaml").read_text())["train"]
    assert on_disk["restorer"]["latent_dim"] == 16 and on_disk["geometry"]["axis"] == "x"
    assert "channels" not in on_disk and "tilt_min" not in on_disk
    assert load_config(tmp_path / "c.yaml") == TrainConfig.from_dict(on_disk)
    assert load_config(tmp_path / "c.yaml").restorer == a.restorer
    # replace with flat names changes the nested settings
    c = a.replace(latent_dim=32, tilt_max=30, lr=None)
    assert c.restorer.latent_dim == 32 and c.restorer.channels == 6
    assert c.geometry.tilt_range == (-50.0, 30.0) and c.lr == 0.003
    with pytest.raises(CryowaeInputError, match="latent_dim given both"):
        TrainConfig.from_dict(nested | {"latent_dim": 8})
    with pytest.raises(CryowaeInputError, match="unknown restorer setting"):
        TrainConfig.from_dict({"restorer": {"chanels": 4}})
    with pytest.raises(CryowaeInputError, match="tilt axis"):
        TrainConfig.from_dict({"tilt_axis": "z"})
    with pytest.raises(CryowaeInputError, match="tilt axis"):
        TrainConfig(geometry=TiltGeometry(-60, 60, "z"))
    with pytest.raises(CryowaeInputError, match="impossible tilt range"):
        TrainConfig.from_dict({"geometry": {"tilt_min": 30, "tilt_max": -30}})
    with pytest.raises(CryowaeInputError, match="multiple of 8"):
        TrainConfig(patch_size=20)


@pytest.mark.slow
def test_same_seed_same_first_steps(tomo, tmp_path):
    cfg = TrainConfig.from_dict(TINY)
    runs = []
    for i in range(2):
        tr = Trainer(load_sources([tomo], min_size=16), cfg, tmp_path / f"r{i}")
        runs.append([tr.train_step()["loss"] for _ in range(3)])
        runs[-1].append(float(sum(p.detach().sum() for p in tr.model.parameters())))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6, abs=1e-7)
    tr = Trainer(load_sources([tomo], min_size=16), cfg.replace(seed=1), tmp_path / "r2")
    other = [tr.train_step()["loss"] for _ in range(3)]
    assert other != pytest.approx(runs[0][:3], rel=1e-6)


@pytest.mark.slow
def test_training_lowers_the_loss(small_sim, tmp_path):
    """The loss on a fixed held-out batch falls after a few steps on a simulated tomogram."""
    from cryowae.training.augment import make_batch
    from cryowae.training.loss import masked_fourier_loss

    cfg = TrainConfig.from_dict(TINY | {"steps": 60, "batch_size": 4, "lr": 3e-3,
                                         "tilt_min": -60, "tilt_max": 60})
    sources = load_sources([small_sim / "tomo.mrc"], [small_sim / "tomo_even.mrc"],
                           [small_sim / "tomo_odd.mrc"], min_size=16)
    tr = Trainer(sources, cfg, tmp_path / "run")
    ins, tgs = tr.sampler.sample(16)
    batch = make_batch(ins, tgs, 16, cfg.geometry, tr.device,
                       generator=torch.Generator().manual_seed(3))

    def held_out() -> float:
        tr.model.eval()
        with torch.no_grad():
            pred, _ = tr.model(batch.inputs)
            loss, _ = masked_fourier_loss(pred, batch, cfg.wedge_weight)
        tr.model.train()
        return float(loss)

    before = held_out()
    for _ in range(cfg.steps):
        tr.train_step()
    after = held_out()
    print("held-out loss before/after", before, after)
    assert after < 0.96 * before


@pytest.mark.slow
def test_same_default_on_100x_intensities(tmp_path):
    """lambda needs no per-dataset tuning: global normalisation + term balancing make a
    100x brighter tomogram train exactly like the original (same losses, same weight)."""
    vol = _smooth_volume(seed=3)
    results = []
    for scale in (1.0, 100.0):
        p = tmp_path / f"t{scale:g}.mrc"
        write_mrc(p, vol * scale + 5 * scale, 10.0)
        tr = Trainer(load_sources([p], min_size=16), TrainConfig.from_dict(TINY),
                     tmp_path / f"run{scale:g}")
        steps = [tr.train_step() for _ in range(4)]
        results.append(([s["loss"] for s in steps], steps[-1]["div_weight"]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-3)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-3)


@pytest.mark.slow
def test_codes_start_on_the_prior_scale(tomo, tmp_path):
    """The data-dependent head initialisation puts the first codes at the prior's mean
    and spread; without it they start as a near-point cloud."""
    src = load_sources([tomo], min_size=16)
    stats = {}
    for n in (0, 32):
        cfg = TrainConfig.from_dict(TINY | {"divergence": "sinkhorn", "init_codes": n})
        tr = Trainer(src, cfg, tmp_path / f"run{n}")
        codes = tr.fresh_codes(64)
        stats[n] = (float(codes.mean(0).abs().mean()), float(codes.std(0).mean()))
    assert stats[0][1] < 0.3
    assert 0.7 < stats[32][1] < 1.3
    assert stats[32][0] < 0.5


@pytest.mark.parametrize("divergence,override,scaled", [
    ("mmd", None, False), ("sinkhorn", None, False), ("sliced", None, True),
    ("mmd", True, True), ("sliced", False, False)])
def test_value_weight_bank_factor_per_divergence(tomo, tmp_path, divergence, override,
                                                 scaled):
    cfg = TrainConfig.from_dict(TINY | {"divergence": divergence,
                                        "bank_value_scaling": override})
    tr = Trainer(load_sources([tomo], min_size=16), cfg, tmp_path / "run")
    for _ in range(3):
        tr.train_step()
    assert len(tr.latent.bank) == 6
    assert tr.latent.value_scale(2) == (pytest.approx(4.0) if scaled else 1.0)


def test_balancer_gets_the_reconstruction_gradient_on_the_codes(tomo, tmp_path):
    """No side channel: the gradient the balancer records is d rec / d z of the step's
    batch, recomputed here on an identical trainer; the model keeps no hidden state."""
    cfg = TrainConfig.from_dict(TINY)
    src = load_sources([tomo], min_size=16)
    a = Trainer(src, cfg, tmp_path / "a")
    b = Trainer(src, cfg, tmp_path / "b")
    for tr in (a, b):  # FiLM and head start at zero: make the code matter from step 0
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for lin in [*tr.model.film, tr.model.head]:
                lin.weight.normal_(0.0, 0.3, generator=g)
    a.train_step()
    from cryowae.training.augment import make_batch
    from cryowae.training.loss import masked_fourier_loss

    inputs, targets = b.sampler.sample(cfg.batch_size)
    batch = make_batch(inputs, targets, cfg.patch_size, cfg.geometry, b.device,
                       generator=b.gen)
    b.model.train()
    out = b.model(batch.inputs, with_features=True)
    rec, _ = masked_fourier_loss(out.restored, batch, cfg.wedge_weight)
    (g_rec,) = torch.autograd.grad(rec, out.z)
    assert a.balancer.grad_count == 1
    assert a.balancer.grad_rec == pytest.approx(float(g_rec.norm()), rel=1e-5)
    assert float(g_rec.norm()) > 0
    assert len(a.latent.bank) == cfg.batch_size  # pooled features came back explicitly
    torch.testing.assert_close(a.latent.bank.codes(), out.pooled.detach())
    assert not hasattr(a.model, "last_pooled") and not hasattr(a.model, "decoder_code_grad")


@pytest.mark.slow  # 3-9 s on one worker
def test_default_path_has_no_latent_matching_end_to_end(tmp_path):
    """The default is no latent matching: the presets train without it, a step has no
    penalty (no `div`, the balancer never runs, no bank), and the run's model.pt
    restores and samples (with the family branch)."""
    assert TrainConfig().divergence == "none"
    for name in ("cpu-small", "gpu-default", "gpu-large"):
        assert load_config(name).divergence == "none"
    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, _smooth_volume(), 10.0)
    tiny = {k: v for k, v in TINY.items() if k not in ("divergence", "family")}
    tiny["family"] = {"latent_channels": 2, "branch_channels": 4, "report_subtomograms": 4}
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({"train": tiny}))
    tr = Trainer(load_sources([tomo], min_size=16), load_config(conf), tmp_path / "step")
    out = tr.train_step()
    assert "div" not in out and "fam_score" in out and tr.balancer.grad_count == 0
    run = tmp_path / "run"
    invoke_cli("train", tomo, "--out", run, "--config", conf, "--steps", "2", check=True)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["div"] == "" for r in rows)
    ck = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)
    assert ck["step"] == 2 and ck["bank"]["codes"].numel() == 0  # nothing banked
    loaded = load_restorer(run / "model.pt")
    assert loaded.stochastic is not None
    assert TrainConfig.from_dict(loaded.train_config).divergence == "none"
    invoke_cli("restore", run / "model.pt", tomo, "--out", tmp_path / "r.mrc", "--tile",
               "16", "--overlap", "4", check=True)
    invoke_cli("sample", run / "model.pt", tomo, "--n", "2", "--tile", "16", "--overlap",
               "4", "--out", tmp_path / "fam", "--spread-calibration", "none", check=True)
    assert (tmp_path / "fam" / "std.mrc").exists()


def _metric_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint as the previous version wrote it: format 1, flat config."""
    state = torch.load(path, weights_only=True)
    cfg = state["config"]
    flat = {k: v for k, v in cfg.items() if k not in ("restorer", "geometry")}
    flat |= cfg["restorer"] | {"tilt_min": cfg["geometry"]["tilt_min"],
                               "tilt_max": cfg["geometry"]["tilt_max"],
                               "tilt_axis": cfg["geometry"]["axis"]}
    state |= {"format": 1, "config": flat}
    torch.save(state, path)


@pytest.mark.slow
def test_resume_in_process_reads_format_1_and_refuses_other_settings(tomo, tmp_path):
    cfg = TrainConfig.from_dict(TINY | {"steps": 4, "tilt_axis": "x"})
    src = load_sources([tomo], min_size=16)
    Trainer(src, cfg, tmp_path / "run").run()
    ck = tmp_path / "run" / "checkpoint.pt"
    _as_format_1(ck)
    assert load_state(ck, KIND_CHECKPOINT)["format"] == 1
    with pytest.raises(CryowaeInputError, match="restorer was"):
        Trainer(src, cfg.replace(latent_dim=16), tmp_path / "run", resume=True)
    res = Trainer(src, cfg.replace(steps=6), tmp_path / "run", resume=True).run()
    assert res.steps == 6 and _metric_steps(tmp_path / "run")[-1] == 6
    state = load_state(ck, KIND_CHECKPOINT)
    assert state["format"] == 2 and state["step"] == 6
    assert state["config"]["geometry"]["axis"] == "x"
    assert load_restorer(tmp_path / "run").geometry.axis == "x"




def test_cancel_stops_training_and_keeps_the_checkpoint(tomo, tmp_path):
    cfg = TrainConfig.from_dict(TINY | {"steps": 100, "checkpoint_every": 50})
    tr = Trainer(load_sources([tomo], min_size=16), cfg, tmp_path / "run",
                 progress=cancel_after(3))
    with pytest.raises(Cancelled, match="cancelled at step 3"):
        tr.run()
    assert load_state(tmp_path / "run" / "checkpoint.pt", KIND_CHECKPOINT)["step"] == 3


@pytest.mark.slow
def test_resume_after_kill(tomo, tiny_config, tmp_path):
    """A real process killed with SIGKILL mid-run resumes from its last checkpoint."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "cryowae", "train", str(tomo), "--out", str(run), "--config",
            str(tiny_config), "--steps", "400", "--tilt-min", "-60", "--tilt-max", "60"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "checkpoint.pt").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)["step"]
    assert 2 <= saved < 400
    # the resumed run in this process (the killed one above was a real process)
    res = invoke_cli("train", tomo, "--out", run, "--resume", "--steps", str(saved + 4))
    assert res.returncode == 0, res.stderr
    after = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)["step"]
    assert after == saved + 4
    steps = _metric_steps(run)
    assert steps[-1] == saved + 4
    # a fresh start without --resume is refused instead of clobbering the run
    res = invoke_cli("train", tomo, "--out", run, "--config", tiny_config)
    assert res.returncode == 2 and "--resume" in res.stderr


@pytest.mark.slow
def test_two_process_gloo_ddp(tomo, tiny_config, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "ddp"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", "29517",
                           "-m", "cryowae", "train", str(tomo), "--out", str(run), "--config",
                           str(tiny_config), "--steps", "3", "--tilt-min", "-60",
                           "--tilt-max", "60", "--device", "cpu",
                           # a budget too: the steps end first, after rank 0's LR horizon
                           # was broadcast at step 3
                           "--minutes", "30"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout + proc.stderr
    model = load_restorer(run)
    assert model.train_config["patch_size"] == 16
    assert _metric_steps(run)[-1] == 3


@pytest.mark.slow
def test_train_reads_tlt_file_and_tilt_axis(tomo, tiny_config, tmp_path):
    """`cryowae train` takes the tilt range of a .tlt file next to the tomogram and the
    axis of --tilt-axis, and stores the geometry in model.pt."""
    np.savetxt(tomo.with_suffix(".tlt"), np.arange(-48.0, 43.0, 3.0))
    run = tmp_path / "run"
    res = invoke_cli("train", tomo, "--out", run, "--config", tiny_config, "--steps", "2",
                     "--tilt-axis", "X")
    assert res.returncode == 0, res.stderr
    geo = load_restorer(run).geometry
    assert (geo.tilt_min, geo.tilt_max, geo.axis) == (-48.0, 42.0, "x")
    assert load_config(run / "config.yaml").geometry.tilt_range == (-48.0, 42.0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    """(tomogram, run directory) of a 2-step tiny training run."""
    d = tmp_path_factory.mktemp("trained")
    tomo = d / "tomo.mrc"
    write_mrc(tomo, _smooth_volume(), 10.0)
    (d / "tiny.yaml").write_text(yaml.safe_dump({"train": TINY}))
    invoke_cli("train", tomo, "--out", d / "run", "--config", d / "tiny.yaml", "--steps",
               "2", "--tilt-min", "-60", "--tilt-max", "60", check=True)
    return tomo, d / "run"


@pytest.mark.parametrize("case", ["small", "halves", "nan", "divergence", "config",
                                  "tilt_axis", "version", "corrupt"])
def test_bad_input_exits_2(case, tomo, tiny_config, tmp_path, trained_run):
    run = tmp_path / "run"
    base = ["train", tomo, "--out", run, "--config", tiny_config, "--steps", "2",
            "--tilt-min", "-60", "--tilt-max", "60"]
    if case == "small":
        write_mrc(tmp_path / "small.mrc", np.zeros((8, 32, 32), np.float32) + 1, 10.0)
        base[1] = tmp_path / "small.mrc"
    elif case == "halves":
        write_mrc(tmp_path / "e.mrc", _smooth_volume(), 10.0)
        write_mrc(tmp_path / "o.mrc", _smooth_volume((24, 32, 30)), 10.0)
        base += ["--even", tmp_path / "e.mrc", "--odd", tmp_path / "o.mrc"]
    elif case == "nan":
        v = _smooth_volume()
        v[3, 4, 5] = np.nan
        write_mrc(tmp_path / "nan.mrc", v, 10.0)
        base[1] = tmp_path / "nan.mrc"
    elif case == "divergence":
        base += ["--divergence", "kl"]
    elif case == "config":
        (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
        base[4] = tmp_path / "bad.yaml"
    elif case == "tilt_axis":
        base += ["--tilt-axis", "z"]
    elif case in ("version", "corrupt"):
        shutil.copytree(trained_run[1], run)
        ck = run / "checkpoint.pt"
        if case == "version":
            state = torch.load(ck, weights_only=True)
            state["cryowae_version"] = "9.9.0"
            torch.save(state, ck)
        else:
            ck.write_bytes(ck.read_bytes()[:1000])
        base = ["train", trained_run[0], "--out", run, "--resume", "--steps", "4"]
    res = invoke_cli(*base)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("cryowae: error")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    if case not in ("version", "corrupt"):
        assert not (run / "checkpoint.pt").exists()


@pytest.mark.slow
def test_refill_keeps_measured_region_and_fills_wedge(tmp_path):
    from cryowae.physics.wedge import apply_wedge, wedge_mask
    from cryowae.training.refill import refill_volume

    tomo = tmp_path / "wedged.mrc"
    write_mrc(tomo, apply_wedge(torch.from_numpy(_smooth_volume()), -60, 60).numpy(), 10.0)
    cfg = TrainConfig.from_dict(TINY | {"refill_every": 2, "steps": 4})
    tr = Trainer(load_sources([tomo], min_size=16), cfg, tmp_path / "run")
    with torch.no_grad():  # make the restorer non-trivial so the fill is not zero
        tr.model.head.weight.normal_(0, 0.5)
    src = tr.sources[0]
    data = np.asarray(src.full, dtype=np.float32)
    filled = refill_volume(tr.model, src.full, src.stats["full"], -60, 60, "y", 16, tr.device)
    m = wedge_mask(data.shape, -60, 60, rfft=True).bool()
    fa, fb = torch.fft.rfftn(torch.from_numpy(data)), torch.fft.rfftn(torch.from_numpy(filled))
    assert torch.allclose(fa[m], fb[m], rtol=1e-4, atol=1e-2)
    wedge_before = fa[~m].abs().pow(2).sum()
    wedge_after = fb[~m].abs().pow(2).sum()
    assert wedge_before < 1e-6 * fa.abs().pow(2).sum()
    assert wedge_after > 1e-3 * fa.abs().pow(2).sum()
    tr.run()
    part = tr.sampler.sources[0]  # the training part (a validation slab is held out)
    assert "full" in part.refilled and part.refilled["full"].shape == part.shape


def test_untrained_restorer_is_a_lowpass_and_identity_skip_is_exact():
    """The default skip starts as a normalised 1-voxel Gaussian: an untrained restorer
    returns the low-passed input (noise variance down ~20x, constants kept); with
    skip="identity" it returns the input exactly."""
    from cryowae.models.restorer import RestorerConfig, WAERestorer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 16, 16, 16, generator=g)
    lp = WAERestorer(RestorerConfig(4, 2, 8)).eval()
    ident = WAERestorer(RestorerConfig(4, 2, 8, skip="identity")).eval()
    with torch.no_grad():
        y_lp, _ = lp(x)
        y_id, _ = ident(x)
        const, _ = lp(torch.full((1, 1, 16, 16, 16), 3.0))
    assert torch.equal(y_id, x)
    # white noise through a Gaussian of sigma 1 voxel: variance x 1 / (8 pi^1.5) = 0.022
    assert float(y_lp[:, :, 4:-4, 4:-4, 4:-4].var()) == pytest.approx(0.0224, rel=0.25)
    assert torch.allclose(const, torch.full_like(const, 3.0), atol=1e-5)
    assert lp.skip_filter.weight.requires_grad  # learnable
    with pytest.raises(CryowaeInputError, match="skip"):
        TrainConfig().replace(skip="median").validate()
