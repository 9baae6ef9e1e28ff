"""Checkpoints: safe loading (weights only), plain contents, the format-1 files of the
previous version."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.models.checkpoint import (
    KIND_CHECKPOINT,
    KIND_MODEL,
    load_restorer,
    load_state,
    save_restorer,
    save_state,
)
from cryowae.models.restorer import RestorerConfig, WAERestorer

from .conftest import invoke_cli


class _TouchOnLoad:
    """Unpickling this object creates the file `path` (a stand-in for any code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tiny_model_path, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(tiny_model_path, weights_only=True)
    state["extra"] = {"note": _TouchOnLoad(marker)}
    evil = tmp_path / "model.pt"
    torch.save(state, evil)
    # the payload is real: an unrestricted load runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, np.random.default_rng(0).normal(size=(16, 16, 16)).astype("f4"), 10.0)
    res = invoke_cli("restore", evil, tomo, "--out", tmp_path / "out.mrc")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "model.pt" in lines[0], res.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.mrc").exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_raw_pickles_and_garbage_are_refused(tmp_path, protocol):
    """Not a torch zip file: a bare pickle with a payload, and plain garbage bytes."""
    import pickle

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"format": 1, "kind": KIND_MODEL, "x": _TouchOnLoad(marker)}, f,
                    protocol=protocol)
    with pytest.raises(CryowaeInputError, match="refused|not a readable"):
        load_state(evil, KIND_MODEL)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CryowaeInputError, match="not a readable cryowae checkpoint"):
        load_state(tmp_path / "junk.pt", KIND_MODEL)


def test_save_state_refuses_objects(tmp_path):
    with pytest.raises(TypeError, match="cannot be stored"):
        save_state(tmp_path / "x.pt", {"config": {"geometry": object()}}, KIND_MODEL)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.slow
def test_training_files_load_weights_only(tmp_path):
    """checkpoint.pt and model.pt of a run with the richest state (WAE-GAN critic,
    reference prior) load with torch's plain weights-only unpickler, and resume."""
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    rng = np.random.default_rng(0)
    vol = rng.normal(size=(24, 32, 32)).astype(np.float32)
    write_mrc(tmp_path / "t.mrc", vol, 10.0)
    refs = [rng.normal(size=(16, 16, 16)).astype(np.float32) for _ in range(2)]
    cfg = TrainConfig.from_dict({
        "patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 8, "steps": 2, "checkpoint_every": 2, "divergence": "adversarial",
        "prior": "reference", "check_prior_preference": False})
    src = load_sources([tmp_path / "t.mrc"], min_size=16)
    Trainer(src, cfg, tmp_path / "run", references=refs).run()
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    model = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ck["prior"]["codes"].shape == (16, 8)  # 2 maps x 8 rotations
    assert ck["divergence"] and model["geometry"] == {"tilt_min": -60.0, "tilt_max": 60.0,
                                                      "axis": "y"}
    tr = Trainer(src, cfg.replace(steps=3), tmp_path / "run", resume=True)  # no references
    assert tr.step == 2
    torch.testing.assert_close(tr.latent.prior.codes.cpu(), ck["prior"]["codes"])


@pytest.mark.slow
def test_format_1_model_loads(tmp_path):
    """A model.pt as the previous version wrote it (format 1, flat train_config with the
    tilt range inside) loads, with its geometry."""
    torch.manual_seed(0)
    model = WAERestorer(RestorerConfig(4, 2, 8)).eval()
    flat = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8,
            "encoder": "deterministic", "skip": "lowpass", "skip_sigma": 1.0,
            "tilt_min": -50.0, "tilt_max": 40.0, "tilt_axis": "x", "prior_sigma": 1.0}
    torch.save({"format": 1, "kind": KIND_MODEL, "cryowae_version": __version__,
                "architecture": model.config.to_dict(), "weights": model.state_dict(),
                "train_config": flat, "voxel_size": 10.0, "norm": [0.0, 1.0],
                "codes": torch.zeros(4, 8), "extra": {}}, tmp_path / "model.pt")
    loaded = load_restorer(tmp_path / "model.pt")
    g = loaded.geometry
    assert (g.tilt_min, g.tilt_max, g.axis) == (-50.0, 40.0, "x")
    assert loaded.patch_size == 16
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x)[0], model(x)[0], rtol=0, atol=0)


def test_new_model_roundtrip_and_wrong_kind(tmp_path):
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.training.config import TrainConfig

    cfg = TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, 8),
                      geometry=TiltGeometry(-45, 55, "x"))
    model = WAERestorer(cfg.restorer)
    save_restorer(tmp_path / "model.pt", model, cfg.to_dict(), 10.0, (0.0, 1.0),
                  torch.zeros(2, 8))
    loaded = load_restorer(tmp_path)
    assert loaded.geometry == TiltGeometry(-45, 55, "x")
    assert TrainConfig.from_dict(loaded.train_config).restorer == cfg.restorer
    with pytest.raises(CryowaeInputError, match="expected a cryowae-checkpoint"):
        load_state(tmp_path / "model.pt", KIND_CHECKPOINT)


@pytest.mark.slow
def test_stochastic_model_roundtrip_composed_at_construction(tmp_path):
    """The family branch is built around the mean path (`StochasticRestorer(cfg,
    mean=...)`): its state_dict keys are those of a model that built its own mean path
    (so model.pt files written before load), model.pt stores the branch's keys alone,
    and a saved-then-loaded model samples exactly as the original, around the loaded
    mean path itself."""
    from cryowae.models.stochastic import StochasticConfig, StochasticRestorer
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.training.config import TrainConfig

    cfg = TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, 8),
                      geometry=TiltGeometry(-45, 55, "y"))
    scfg = StochasticConfig(restorer=cfg.restorer, latent_channels=2, branch_channels=4)
    torch.manual_seed(1)
    mean = WAERestorer(cfg.restorer)
    model = StochasticRestorer(scfg, mean=mean).eval()
    assert model.mean is mean
    assert list(model.state_dict()) == list(StochasticRestorer(scfg).state_dict())
    with pytest.raises(ValueError, match="another mean path"):
        StochasticRestorer(scfg, mean=WAERestorer(RestorerConfig(4, 1, 8)))
    save_restorer(tmp_path / "model.pt", mean, cfg.to_dict(), 10.0, (0.0, 1.0),
                  torch.zeros(2, 8), stochastic=model)
    stored = load_state(tmp_path / "model.pt", KIND_MODEL)["stochastic"]["weights"]
    assert stored and not any(k.startswith("mean.") for k in stored)
    assert set(stored) | {f"mean.{k}" for k in mean.state_dict()} == set(model.state_dict())
    loaded = load_restorer(tmp_path)
    assert loaded.stochastic is not None and loaded.stochastic.mean is loaded.model
    x = torch.randn(2, 1, 16, 16, 16)
    z = model.draw_prior((16, 16, 16), 2, 3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(x, z=z), loaded.stochastic(x, z=z)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert float(want[1].std(dim=1).mean()) > 0  # the samples depend on z
