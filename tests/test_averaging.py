"""The running average of the weights (`cryowae.training.averaging`) and its place in
training: validation and model.pt read it, resumption restores it."""

from __future__ import annotations

import pytest
import torch
import yaml

from cryowae.models.checkpoint import KIND_CHECKPOINT, load_restorer, load_state
from cryowae.training.averaging import WeightAverage
from cryowae.training.config import TrainConfig
from cryowae.training.data import load_sources
from cryowae.training.loop import Trainer
from tests.conftest import invoke_cli, write_smooth_tomogram

TINY = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 1, "checkpoint_every": 2, "lr": 2e-3,
        "family": False, "check_prior_preference": False}


def test_average_follows_the_formula():
    """a_1 = w_1, then a_t = d_t a_(t-1) + (1 - d_t) w_t with d_t = min(d, (1+n)/(10+n)),
    n the steps averaged before: checked against the recursion written out by hand."""
    lin = torch.nn.Linear(3, 2)
    avg = WeightAverage(lin, decay=0.5)
    expected = None
    for t in range(6):
        with torch.no_grad():
            lin.weight.copy_(torch.full((2, 3), float(t * t)))
        avg.update()
        w = float(t * t)
        if expected is None:
            expected = w
        else:
            d = min(0.5, (1 + t) / (10 + t))  # t steps averaged before this one
            expected = d * expected + (1 - d) * w
        assert torch.allclose(avg.module.weight, torch.full((2, 3), expected))
    assert not torch.equal(avg.module.weight, lin.weight)


def test_decay_zero_is_the_model_itself_and_bad_decays_are_refused():
    lin = torch.nn.Linear(2, 2)
    avg = WeightAverage(lin, decay=0.0)
    avg.update()
    assert avg.module is lin and avg.state_dict() == {}
    with pytest.raises(ValueError, match="ema_decay"):
        WeightAverage(lin, decay=1.0)
    with pytest.raises(Exception, match="ema_decay"):
        TrainConfig.from_dict({"ema_decay": -0.1})


def test_average_of_noisy_steps_lies_closer_to_the_optimum():
    """SGD on |w|^2 / 2 with gradient noise of unit variance: the last step's weights
    scatter about the optimum 0 with variance lr / (2 - lr) per coordinate; the average
    over ~1/(1-d) steps has a much smaller one (~ lr (1 - d) / 2 for small lr)."""
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(4000))
    holder = torch.nn.Module()
    holder.w = w
    avg = WeightAverage(holder, decay=0.95)
    lr = 0.2
    for _ in range(400):
        with torch.no_grad():
            w -= lr * (w + torch.randn(4000, generator=g))
        avg.update()
    raw_var = float(w.detach().pow(2).mean())
    avg_var = float(avg.module.w.detach().pow(2).mean())
    assert raw_var == pytest.approx(lr / (2 - lr), rel=0.1)
    assert avg_var < raw_var / 5


@pytest.mark.slow
def test_trainer_stores_validates_and_resumes_the_average(tmp_path):
    tomo = write_smooth_tomogram(tmp_path)
    run = tmp_path / "run"
    cfg = TrainConfig.from_dict(TINY | {"steps": 4, "ema_decay": 0.9})
    tr = Trainer(load_sources([tomo], min_size=16), cfg, run)
    tr.run()
    kept = tr.kept_model.state_dict()
    raw = tr.model.state_dict()
    # model.pt holds the average, not the last step's weights
    stored = load_restorer(run).model.state_dict()
    assert all(torch.equal(stored[k], kept[k].cpu()) for k in kept)
    assert any(not torch.equal(kept[k], raw[k]) for k in kept if kept[k].is_floating_point())
    # the checkpoint carries it; --resume restores it bit for bit, and goes on averaging
    saved = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)["average"]
    tr2 = Trainer(tr.sources, cfg.replace(steps=5), run, resume=True)
    back = tr2.average.state_dict()
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)
    before = {k: v.clone() for k, v in tr2.kept_model.state_dict().items()}
    tr2.train_step()
    after = tr2.kept_model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before
               if before[k].is_floating_point())
    # with ema_decay 0 model.pt holds the last step's weights
    run0 = tmp_path / "run0"
    tr0 = Trainer(tr.sources, cfg.replace(ema_decay=0.0, steps=2), run0)
    tr0.run()
    stored0 = load_restorer(run0).model.state_dict()
    assert all(torch.equal(stored0[k], v.cpu()) for k, v in tr0.model.state_dict().items())


def test_a_checkpoint_without_an_average_restarts_it_from_the_weights():
    lin = torch.nn.Linear(2, 2)
    avg = WeightAverage(lin, decay=0.9)
    avg.update()
    with torch.no_grad():
        lin.weight.add_(1.0)
    avg.load_state_dict({})  # an older checkpoint.pt: no "average" entry
    assert torch.equal(avg.module.weight, lin.weight)
    with torch.no_grad():
        lin.weight.add_(1.0)
    avg.update()  # the second step averaged: d = min(0.9, 2 / 11)
    d = 2 / 11
    assert torch.allclose(avg.module.weight, lin.weight - d * 1.0)


@pytest.mark.slow
def test_cli_ema_decay(tmp_path):
    """`train --ema-decay` reaches the config (model.pt's train_config) and a decay
    outside [0, 1) is refused with one line and exit code 2."""
    tomo = write_smooth_tomogram(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"train": TINY | {"steps": 1}}))
    tilt = ("--tilt-min", "-60", "--tilt-max", "60")
    bad = invoke_cli("train", tomo, "--config", cfg, "--out", tmp_path / "bad",
                     "--ema-decay", "1.5", *tilt)
    assert bad.returncode == 2 and "ema_decay" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    invoke_cli("train", tomo, "--config", cfg, "--out", tmp_path / "run", "--ema-decay",
               "0.5", *tilt, check=True)
    stored = load_state(tmp_path / "run" / "model.pt", "cryowae-restorer")
    assert stored["train_config"]["ema_decay"] == 0.5
