"""Training with the posterior-family branch: config and flags, the mean path unchanged,
samples that depend on z, the m = 1 ablation, model.pt and --resume with the branch,
the final matching figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.models.checkpoint import KIND_CHECKPOINT, load_restorer, load_state
from cryowae.training.config import TrainConfig, load_config
from cryowae.training.data import load_sources
from cryowae.training.family_config import FamilySettings
from cryowae.training.loop import Trainer

from .conftest import invoke_cli

TINY = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
        "bank_size": 64, "log_every": 1, "checkpoint_every": 2, "steps": 6, "lr": 2e-3,
        "check_prior_preference": False,
        # the mean path with its latent penalty (off by default), as these runs recorded
        "divergence": "mmd"}
SMALL_FAMILY = {"latent_channels": 4, "branch_channels": 4, "report_subtomograms": 8,
                "posterior_matching": True, "branch_every": 1}


def _volume(shape=(24, 32, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    v = torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2)[0, 0].numpy()
    return (v * 5 + 0.2 * rng.normal(size=shape)).astype(np.float32)


@pytest.fixture()
def tomo(tmp_path) -> Path:
    p = tmp_path / "tomo.mrc"
    write_mrc(p, _volume(), 10.0)
    return p


def _trainer(tomo: Path, run: Path, family, **changes) -> Trainer:
    cfg = TrainConfig.from_dict(TINY | changes | {"family": family})
    return Trainer(load_sources([tomo], min_size=16), cfg, run)


def test_family_settings_keys_and_validation(tmp_path):
    assert TrainConfig().family.enabled  # on by default for new runs
    cfg = TrainConfig.from_dict({"family": {"samples": 1, "score": "shells",
                                            "posterior-matching": False}})
    assert (cfg.family.samples, cfg.family.score, cfg.family.posterior_matching) == \
        (1, "shells", False)
    assert TrainConfig.from_dict({"family": False}).family == FamilySettings(enabled=False)
    # YAML round trip keeps the nested section; an old file without it gets the default
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": cfg.to_dict()}))
    assert load_config(p).family == cfg.family
    p.write_text(yaml.safe_dump({"train": {"patch_size": 32, "channels": 4}}))
    assert load_config(p).family == FamilySettings()
    assert not FamilySettings.of_saved_config({"patch_size": 32}).enabled
    for bad, match in (({"score": "crps"}, "unknown family score"),
                       ({"samples": 0}, "samples"), ({"noise": "guess"}, "noise source"),
                       ({"matching_divergence": "none"}, "matching divergence"),
                       ({"latent_channels": 0}, "latent_channels"),
                       ({"colour": 1}, "unknown family setting")):
        with pytest.raises(CryowaeInputError, match=match):
            TrainConfig.from_dict({"family": bad})


def test_the_family_leaves_the_mean_path_unchanged(tomo, tmp_path):
    """Same seed, family on or off: the mean path's figures and weights are identical
    (the branch has its own RNG stream, detached inputs and its own clipping)."""
    runs = {}
    for on in (False, True):
        tr = _trainer(tomo, tmp_path / f"r{on}", SMALL_FAMILY | {"enabled": on})
        outs = [tr.train_step() for _ in range(3)]
        runs[on] = ([o["loss"] for o in outs], [p.detach().clone()
                                                for p in tr.model.parameters()])
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[True][1], runs[False][1], strict=True))
    assert {"fam_score", "fam_spread_wedge", "fam_match"} <= set(outs[-1])


def test_branch_every_k_steps(tomo, tmp_path):
    """branch_every = 2: the branch trains on steps 0, 2, ... only; between them its
    weights stay and the mean path's steps are those of a run without the family."""
    tr = _trainer(tomo, tmp_path / "e2", SMALL_FAMILY | {"branch_every": 2,
                                                         "posterior_matching": False})
    off = _trainer(tomo, tmp_path / "off", SMALL_FAMILY | {"enabled": False})

    def branch() -> list[torch.Tensor]:
        return [p.detach().clone() for p in tr.family.branch_parameters()]

    outs, weights = [], [branch()]
    for _ in range(3):
        outs.append(tr.train_step())
        weights.append(branch())
    assert ["fam_score" in o for o in outs] == [True, False, True]
    changed = [any(not torch.equal(a, b) for a, b in zip(weights[i], weights[i + 1],
                                                         strict=True)) for i in range(3)]
    assert changed == [True, False, True]
    assert [o["loss"] for o in outs] == [off.train_step()["loss"] for _ in range(3)]
    with pytest.raises(CryowaeInputError, match="branch_every"):
        TrainConfig.from_dict({"family": {"branch_every": 0}})


def _spread_after(tomo: Path, run: Path, samples: int, steps: int) -> float:
    tr = _trainer(tomo, run, SMALL_FAMILY | {"samples": samples,
                                             "posterior_matching": False},
                  lr=5e-3, steps=steps)
    return float(np.mean([tr.train_step()["fam_spread_wedge"] for _ in range(steps)][-5:]))


@pytest.mark.slow
def test_samples_depend_on_z_and_the_m1_ablation_collapses(tomo, tmp_path):
    """After the same steps, the energy score (m = 2) keeps a spread in the wedge while
    the squared-error ablation (m = 1) shrinks it (measured: see the printout)."""
    m2 = _spread_after(tomo, tmp_path / "m2", 2, 40)
    m1 = _spread_after(tomo, tmp_path / "m1", 1, 40)
    print("wedge spread m=2 / m=1:", m2, m1)
    assert m2 > 0
    assert m1 < 0.3 * m2


@pytest.mark.slow
def test_model_pt_and_resume_with_the_branch(tomo, tmp_path):
    """model.pt holds the branch: `load_restorer` gives the mean path and the whole
    stochastic model (the running average of the trained one: the same samples for the
    same field); the run reports
    the matching figure; --resume puts the branch back."""
    run = tmp_path / "run"
    tr = _trainer(tomo, run, SMALL_FAMILY, steps=2)
    result = tr.run()
    fig = result.final
    assert fig["family_mmd_null"] > 0 and np.isfinite(fig["family_mmd"])
    loaded = load_restorer(run)
    st = loaded.stochastic
    assert st is not None and st.mean is loaded.model and not st.training
    assert load_state(run / "model.pt", "cryowae-restorer")["extra"]["family_matching"] \
        == pytest.approx({k: v for k, v in fig.items() if k.startswith("family_")})
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kept = tr.average.module.eval()
    z = st.draw_prior((16, 16, 16), 1, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = st(x, z=z)[1], kept(x, z=z)[1]
    assert torch.equal(a, b) and float((a[0, 0] - a[0, 1]).abs().max()) > 0
    # metrics.csv carries the per-step figures and the final one
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    assert "fam_spread_wedge" in header and rows[-1].split(",")[-1] != ""
    # resume: the branch's weights and state come back, training continues
    saved = load_state(run / "checkpoint.pt", KIND_CHECKPOINT)["family"]["weights"]
    tr2 = _trainer(tomo, run, SMALL_FAMILY, steps=3)
    tr2 = Trainer(tr2.sources, tr2.cfg, run, resume=True)
    now = {k: v for k, v in tr2.family.model.state_dict().items() if not k.startswith("mean.")}
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert tr2.step == 2 and "fam_score" in tr2.train_step()
    with pytest.raises(CryowaeInputError, match="family latent_channels"):
        Trainer(tr2.sources, tr2.cfg.replace(family=tr2.cfg.family.to_dict()
                                             | {"latent_channels": 2}), run, resume=True)


@pytest.mark.slow
def test_cli_family_flags(tomo, tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"train": TINY | {"steps": 1, "family": SMALL_FAMILY}}))
    out = tmp_path / "run"
    res = invoke_cli("train", tomo, "--config", cfg, "--out", out, "--samples-per-input",
                     "3", "--score", "shells", "--no-posterior-matching", check=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]["family"]
    assert (saved["samples"], saved["score"], saved["posterior_matching"]) == \
        (3, "shells", False)
    assert load_restorer(out).stochastic is not None
    assert "family matching: no posterior branch" not in res.stdout  # logged, not printed
    res = invoke_cli("train", tomo, "--config", cfg, "--out", tmp_path / "off",
                     "--no-family", check=True)
    assert load_restorer(tmp_path / "off").stochastic is None
    bad = invoke_cli("train", tomo, "--config", cfg, "--out", tmp_path / "bad",
                     "--score", "crps")
    assert bad.returncode == 2 and "unknown family score" in bad.stderr
