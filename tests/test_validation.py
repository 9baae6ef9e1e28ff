"""The held-out validation loss and the plateau rule: the held-out slab never reaches the
training sampler, the loss is deterministic, the rule fires at a known knee and not on
a falling curve, and `train --until-plateau` stops there with model.pt written."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import yaml

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.models.checkpoint import KIND_CHECKPOINT, load_restorer, load_state
from cryowae.training.config import TrainConfig
from cryowae.training.data import SubtomogramSampler, TomogramSource, structure_map
from cryowae.training.loop import Trainer
from cryowae.training.plateau import excess_slopes, has_plateaued, plateau_index
from cryowae.training.validation import ValidationMonitor, split_sources
from cryowae.training.validation_config import ValidationSettings

from .conftest import invoke_cli

TINY = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 1, "checkpoint_every": 2, "steps": 6, "lr": 2e-3,
        "check_prior_preference": False, "family": False}


def _x_coded(shape=(24, 32, 48), halves: bool = True) -> TomogramSource:
    """A source whose every voxel holds its own X index (normalisation mean 0, std 1),
    so a crop's values say where it was cut."""
    x = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape).copy()
    src = TomogramSource("coded", full=x, stats={"full": (0.0, 1.0)})
    if halves:
        src.even, src.odd = x.copy(), x.copy()
        src.stats |= {"even": (0.0, 1.0), "odd": (0.0, 1.0)}
    src.structure = structure_map(x)
    return src


@pytest.mark.slow
def test_held_out_slab_never_reaches_the_training_sampler(tmp_path):
    """By construction: 1000 training crops of the Trainer's own sampler hold no voxel
    of the held-out slab (X >= its start), and every validation crop lies in it."""
    src = _x_coded()
    cfg = TrainConfig.from_dict(TINY | {"validation": {"crops": 6}})
    trainer = Trainer([src], cfg, tmp_path / "run")
    slab = trainer.validation.slabs[0]
    assert (slab.axis, slab.start, slab.size) == (2, 32, 48)  # one patch (16) of X = 48
    seen = set()
    for _ in range(50):
        inputs, targets = trainer.sampler.sample(10)
        for a in inputs + targets:
            seen.update(np.unique(a).astype(int).tolist())
    assert max(seen) < slab.start and min(seen) == 0
    assert len(seen) == slab.start  # the sampler still reaches the whole training part
    _, held, _ = split_sources([src], cfg.validation, cfg.patch_size)
    inputs, targets = SubtomogramSampler(held, 16, seed=3).sample(20)
    for a in inputs + targets:
        assert a.min() >= slab.start and a.max() <= 47


def test_longest_lateral_axis_is_split_and_too_small_volumes_are_refused():
    src = _x_coded((24, 64, 40), halves=False)
    train, held, slabs = split_sources([src], ValidationSettings(holdout=0.25), 16)
    assert slabs[0].axis == 1 and slabs[0].start == 48  # Y: 64 > 40, a quarter held out
    assert train[0].shape == (24, 48, 40) and held[0].shape == (24, 16, 40)
    np.testing.assert_array_equal(np.asarray(held[0].full), src.full[:, 48:, :])
    with pytest.raises(CryowaeInputError, match="too small"):
        split_sources([_x_coded((24, 24, 24))], ValidationSettings(), 16)


def _smooth_source(seed: int = 0) -> TomogramSource:
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=(24, 32, 48)).astype(np.float32))[None, None]
    v = (torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2)[0, 0] * 5).numpy()
    src = TomogramSource("smooth", full=v, stats={"full": (float(v.mean()), float(v.std()))})
    src.structure = structure_map(v)
    return src


def test_validation_loss_is_deterministic_for_fixed_weights():
    """Two monitors built apart give the same loss for the same weights, twice; the
    model's training mode is put back; other weights give another loss."""
    cfg = TrainConfig.from_dict(TINY | {"validation": {"crops": 4}})
    from cryowae.models.restorer import WAERestorer

    torch.manual_seed(0)
    model = WAERestorer(cfg.restorer).train()
    cpu = torch.device("cpu")
    _, a = ValidationMonitor.build([_smooth_source()], cfg, cpu)
    _, b = ValidationMonitor.build([_smooth_source()], cfg, cpu)
    va, va2, vb = a.evaluate(model, 0), a.evaluate(model, 1), b.evaluate(model, 0)
    assert va == va2 == vb and np.isfinite(va) and va > 0
    assert model.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert a.evaluate(model, 2) != va
    assert sum(x.inputs.shape[0] for x in a.batches) == 4


RULE = ValidationSettings(window=3.0, threshold=0.05, start=0.3, min_evals=8)
HORIZON = 1000  # steps of the run; a tenth is 100 steps
STEPS = np.arange(10, HORIZON + 1, 10)  # an evaluation every 10 steps


def test_the_fitted_slope_is_the_excess_change_per_tenth():
    """An excess exp(-k s / t) over a floor has the slope -k per tenth exactly; the rule
    looks from 30 % of the run on, with at least 8 evaluations in its window."""
    for k in (0.02, 0.2):
        b = excess_slopes(STEPS, 0.4 + 0.1 * np.exp(-k * STEPS / 100), HORIZON, RULE,
                          floor=0.4)
        looked = ~np.isnan(b)
        assert STEPS[looked][0] == 300 and np.isnan(b[STEPS < 300]).all()
        np.testing.assert_allclose(b[looked], -k, rtol=1e-6)
    # a flat curve: the call is the first evaluation the rule looks at
    assert STEPS[plateau_index(STEPS, np.full(len(STEPS), 0.5), HORIZON, RULE)] == 300


def test_plateau_rule_fires_after_a_known_knee():
    """The excess falls by 20 % per tenth until step 500, then stays flat, with 1 %
    noise: the call comes after the knee (the window must reach the flat part) and
    before the window lies wholly on it (step 800, slope 0 up to the noise)."""
    rng = np.random.default_rng(1)
    excess = np.exp(-0.2 * np.minimum(STEPS, 500) / 100) * (
        1 + 0.01 * rng.standard_normal(len(STEPS)))
    k = plateau_index(STEPS, 0.3 + excess, HORIZON, RULE, floor=0.3)
    assert k is not None and 500 < STEPS[k] <= 800
    assert not has_plateaued(STEPS[:k], 0.3 + excess[:k], HORIZON, RULE, floor=0.3)
    assert has_plateaued(STEPS[:k + 1], 0.3 + excess[:k + 1], HORIZON, RULE, floor=0.3)


def test_plateau_rule_stays_silent_on_a_falling_curve_and_a_dip():
    """A fall of 10 % per tenth (twice the threshold) all along: no plateau, with 1 %
    noise; an outlier dip in the middle of a fall does not fake one (the fit averages
    it); a rising curve has stopped improving: a plateau as soon as the rule looks."""
    rng = np.random.default_rng(2)
    noise = 1 + 0.01 * rng.standard_normal(len(STEPS))
    falling = np.exp(-0.1 * STEPS / 100) * noise
    assert plateau_index(STEPS, falling, HORIZON, RULE) is None
    rising = plateau_index(STEPS, np.exp(0.1 * STEPS / 100) * noise, HORIZON, RULE)
    assert STEPS[rising] == 300
    dipped = falling.copy()
    dipped[50] *= 0.5
    assert plateau_index(STEPS, dipped, HORIZON, RULE) is None
    # in a shorter run the same fall per step is a smaller fall per tenth: a plateau
    k = plateau_index(STEPS, falling, 400, RULE)
    assert k is not None and STEPS[k] == 120  # 0.3 x 400, with 12 evaluations fitted


def test_settings_are_validated_and_round_trip():
    cfg = TrainConfig.from_dict({"validation": {"every": 5, "until-plateau": True}})
    assert cfg.validation.every == 5 and cfg.validation.until_plateau
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert not TrainConfig.from_dict({"validation": False}).validation.enabled
    for bad in ({"holdout": 0.7}, {"every": 0}, {"threshold": 0}, {"window": 11},
                {"start": 1.0}, {"min_evals": 2}, {"smooth": 3, "start": 0.5},
                {"enabled": False, "until_plateau": True}, {"crops": "8"}, {"nope": 1}):
        with pytest.raises(CryowaeInputError):
            TrainConfig.from_dict({"validation": bad})
    # a run of the earlier rule (running median over `smooth` evaluations) loads with
    # today's rule settings and its own held-out slab
    old = TrainConfig.from_dict({"validation": {"holdout": 0.2, "smooth": 3, "window": 6,
                                                "threshold": 0.02, "min_evals": 8}})
    assert old.validation == ValidationSettings(holdout=0.2)


@pytest.mark.slow(seconds=50)
def test_until_plateau_stops_before_the_ceiling_and_writes_the_model(tmp_path):
    """A tiny run evaluated every step with a loose rule plateaus within seconds: it
    stops below its 30-step ceiling, at the step the line names, with checkpoint
    and model.pt written, the val_loss column filled and the curve drawn; --resume
    continues it."""
    v = _smooth_source().full
    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, v, 10.0)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({"train": TINY | {"validation": {
        "every": 1, "crops": 2, "window": 10, "start": 0, "min_evals": 3,
        "threshold": 0.5}}}))
    run = tmp_path / "run"
    res = invoke_cli("train", str(tomo), "--config", str(conf), "--out", str(run),
                     "--steps", "30", "--until-plateau", "--device", "cpu", "--seed", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the validation loss has plateaued" in res.stderr
    state = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)
    step = state["validation"]["plateau_step"]
    assert 3 <= step == state["step"] < 30
    assert f"plateau at step {step}" in res.stdout
    assert load_restorer(run / "model.pt").model is not None
    with open(run / "metrics.csv", newline="") as f:
        vals = [r["val_loss"] for r in csv.DictReader(f) if r["val_loss"]]
    assert len(vals) == step and (run / "training_curve.png").stat().st_size > 1000
    res = invoke_cli("train", str(tomo), "--out", str(run), "--resume", "--no-until-plateau",
                     "--steps", str(step + 2), "--device", "cpu")
    assert res.returncode == 0, res.stdout + res.stderr
    assert load_state(run / "checkpoint.pt", KIND_CHECKPOINT)["step"] == step + 2
