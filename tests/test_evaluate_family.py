"""`cryowae evaluate FAMILY --gt GT` on a family directory built by hand from a family
whose calibration is known by construction, with a ground truth from another program
(its own intensity scale, another simulator's meta.json beside it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import apply_wedge
from cryowae.sampling.evaluate import truth_ctf

from .conftest import invoke_cli

SHAPE = (16, 24, 24)
S = 12
GEO = TiltGeometry(-50.0, 50.0)
FOREIGN = {"simulator": "other-sim 2.1", "pixel_size_nm": 1.0,
           "config": {"ctf": True, "defocus_um": -3.0}}
SIM = {"command": "simulate", "config": {"ctf": True, "defocus": 2.0, "voltage": 300.0,
                                         "cs": 2.7, "amplitude_contrast": 0.07}}


def _fields(gen: torch.Generator, n: int) -> torch.Tensor:
    amp = torch.exp(-(radial_frequency(SHAPE) / 0.25) ** 2)
    amp = amp / amp.square().mean().sqrt()
    w = torch.fft.fftn(torch.randn((n, *SHAPE), generator=gen), dim=(-3, -2, -1),
                       norm="ortho")
    return torch.fft.ifftn(w * amp, dim=(-3, -2, -1), norm="ortho").real


def _write_family(root: Path, scale: float) -> dict[str, Path]:
    """Truth and S samples i.i.d. from N(mu, sigma(x)^2) on the data's scale (samples'
    deviations times `scale`); the data = the truth's measured region on that scale; the
    ground truth file on its own scale (x 0.5 - 2) with a foreign meta.json beside it."""
    import zarr

    gen = torch.Generator().manual_seed(0)
    mu = 2.0 * _fields(gen, 1)[0]
    sig = 0.3 * 10 ** torch.linspace(0, 1, SHAPE[2])[None, None, :]
    truth = 3.0 * (mu + sig * _fields(gen, 1)[0]) + 7.0
    samples = 3.0 * (mu + scale * sig * _fields(gen, S)) + 7.0
    data = apply_wedge(truth - 7.0, GEO.tilt_min, GEO.tilt_max) + 7.0
    fam, gt_dir = root / "fam", root / "gt"
    fam.mkdir()
    gt_dir.mkdir()
    arr = zarr.create_array(store=str(fam / "samples.zarr" / "0"), shape=samples.shape,
                            dtype="float32", chunks=(1, *SHAPE))
    arr[:] = samples.numpy()
    write_mrc(root / "tomo.mrc", data.numpy(), 10.0)
    write_mrc(gt_dir / "gt.mrc", ((truth - 7.0) / 6.0).numpy(), 10.0)
    (gt_dir / "meta.json").write_text(json.dumps(FOREIGN))
    (fam / "family.json").write_text(json.dumps({"geometry": GEO.to_dict(),
                                                 "tomogram": str(root / "tomo.mrc")}))
    return {"fam": fam, "gt": gt_dir / "gt.mrc", "tomo": root / "tomo.mrc"}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict[str, Path]:
    return _write_family(tmp_path_factory.mktemp("calibrated"), 1.0)


def test_evaluate_calibrated_family_with_a_foreign_meta_json(calibrated, tmp_path):
    out = tmp_path / "report.json"
    res = invoke_cli("evaluate", calibrated["fam"], "--gt", calibrated["gt"], "--out", out)
    assert res.returncode == 0, res.stderr
    notes = res.stderr.strip().splitlines()
    assert len(notes) == 1 and "not a cryowae simulation's meta.json" in notes[0], notes
    assert "outside [min, max]" in res.stdout and "ENCE" in res.stdout
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(out.read_text())
    assert rep["truth"].startswith("raw ground truth") and rep["ctf_mode"] == "auto"
    assert rep["truth_scale"]["a"] == pytest.approx(6.0, rel=1e-3)  # gt = (truth - 7) / 6
    ss = rep["spread_skill"]
    for key in ("spread_skill", "spread_skill_measured", "spread_skill_wedge"):
        assert ss[key] == pytest.approx(1.0, abs=0.12), (key, ss[key])
    assert rep["outside_range"]["ideal"] == pytest.approx(2 / (S + 1))
    assert rep["outside_range"]["fraction"] == pytest.approx(2 / (S + 1), abs=0.03)
    cov = rep["coverage"]
    assert cov["all_50"] == pytest.approx(0.5, abs=0.06)
    assert cov["all_90"] == pytest.approx(0.9, abs=0.04)
    assert rep["reliability"]["ence"] < 0.15 and len(rep["reliability"]["bins"]) == 10
    sp = rep["sparsification"]
    assert sp["restoration_maps_from"] == "family mean"
    assert sp["std"]["gain"] > 0.2  # the std map knows where sigma is large
    assert len(sp["std"]["curve"]) == 100
    assert rep["crps"]["crps_family"] < rep["crps"]["mae_family_mean"]
    # E CRPS of a calibrated Gaussian N(mu, s^2) is s / sqrt(pi); here s = 3 sigma(x)
    sigma = 0.3 * 10 ** np.linspace(0, 1, SHAPE[2])
    assert rep["crps"]["crps_family"] == pytest.approx(3 * sigma.mean() / math.sqrt(math.pi),
                                                       rel=0.1)
    assert "warnings" in rep and len(rep["warnings"]) == 1


def test_evaluate_mis_scaled_families(tmp_path):
    reps = {}
    for name, scale in (("wide", 2.0), ("narrow", 0.5)):
        (tmp_path / name).mkdir()
        case = _write_family(tmp_path / name, scale)
        res = invoke_cli("evaluate", case["fam"], "--gt", case["gt"], "--json",
                         "--ctf", "none")
        assert res.returncode == 0 and res.stderr == "", res.stderr
        reps[name] = json.loads(res.stdout)
    for name, scale in (("wide", 2.0), ("narrow", 0.5)):
        rep = reps[name]
        want = scale * math.sqrt((S + 1) / S) / math.sqrt(1 + scale**2 / S)
        assert rep["spread_skill"]["spread_skill"] == pytest.approx(want, rel=0.12)
        assert rep["reliability"]["ence"] > 0.35
        assert rep["truth"] == "raw ground truth (--ctf none)"
    assert reps["wide"]["outside_range"]["fraction"] < 0.05
    assert reps["narrow"]["outside_range"]["fraction"] > 0.3
    assert reps["wide"]["coverage"]["all_90"] > 0.97
    assert reps["narrow"]["coverage"]["all_90"] < 0.7


def test_png_option_and_restored_maps(calibrated, tmp_path):
    png = tmp_path / "fig.png"
    res = invoke_cli("evaluate", calibrated["fam"], "--gt", calibrated["gt"], "--json",
                     "--png", png, "--restored", calibrated["tomo"], "--ctf", "none")
    assert res.returncode == 0, res.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    rep = json.loads(res.stdout)
    assert rep["sparsification"]["restoration_maps_from"] == "restored"
    assert "mae_single" in rep["crps"]


def test_truth_ctf_modes(tmp_path):
    gt = tmp_path / "gt.mrc"
    assert truth_ctf(gt).params is None and truth_ctf(gt).warning is None  # no meta.json
    with pytest.raises(CryowaeInputError, match="--ctf abs needs"):
        truth_ctf(gt, mode="abs")
    (tmp_path / "meta.json").write_text(json.dumps(FOREIGN))
    foreign = truth_ctf(gt)
    assert foreign.params is None and "defocus" in foreign.warning
    assert truth_ctf(gt, mode="none").warning is None
    with pytest.raises(CryowaeInputError, match="not a cryowae simulation"):
        truth_ctf(gt, sim_meta=tmp_path / "meta.json")
    with pytest.raises(CryowaeInputError, match="not a cryowae simulation"):
        truth_ctf(gt, mode="abs")
    (tmp_path / "meta.json").write_text("{not json")
    assert "not valid JSON" in truth_ctf(gt).warning
    (tmp_path / "meta.json").write_text(json.dumps(SIM))
    sim = truth_ctf(gt)
    assert sim.params is not None and sim.params.defocus == 2.0 and sim.warning is None
    assert truth_ctf(gt, mode="abs").params == sim.params
    (tmp_path / "meta.json").write_text(json.dumps({"config": {"ctf": False}}))
    assert truth_ctf(gt).params is None
    with pytest.raises(CryowaeInputError, match="no CTF"):
        truth_ctf(gt, mode="abs")
    with pytest.raises(CryowaeInputError, match="unknown CTF mode"):
        truth_ctf(gt, mode="phase")


@pytest.mark.parametrize("args, message", [
    (["--ctf", "abs"], "not a cryowae simulation"),
    (["--ctf", "wrong"], "unknown CTF mode"),
    (["--even", "x.mrc"], "both --even and --odd"),
])
def test_evaluate_family_errors(calibrated, args, message):
    res = invoke_cli("evaluate", calibrated["fam"], "--gt", calibrated["gt"], *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_family_options_refused_for_a_single_volume(calibrated):
    res = invoke_cli("evaluate", calibrated["tomo"], "--gt", calibrated["gt"], "--png",
                     "x.png")
    assert res.returncode == 2 and "for a family directory" in res.stderr
