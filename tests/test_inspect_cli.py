"""`cryowae inspect` (text, JSON, picture, contrast polarity) and the spectrum check of
train, restore and sample on simulated tomograms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cryowae.inspection import contrast_polarity, intensity_stats
from cryowae.io import write_mrc
from cryowae.simulation import SimulationConfig, simulate_tomogram

from .conftest import invoke_cli


@pytest.fixture(scope="module")
def sims(tmp_path_factory) -> dict[str, Path]:
    """40x64x64 simulated tomograms at 10 A (protein bright, as the simulator writes):
    tilts -45..65 about Y, the same negated (protein dark), and -60..60 about Y with Y
    and Z swapped (an unrotated IMOD reconstruction), plus its unswapped original."""
    d = tmp_path_factory.mktemp("inspect")
    asym = simulate_tomogram(SimulationConfig(size=64, voxel_size=10.0, seed=1,
                                              tilt_min=-45, tilt_max=65))["tomo"].numpy()
    sym = simulate_tomogram(SimulationConfig(size=64, voxel_size=10.0, seed=1))["tomo"]
    vols = {"asym": asym, "dark": -asym, "sym": sym.numpy(),
            "swapped": np.ascontiguousarray(sym.numpy().transpose(1, 0, 2))}
    return {k: write_mrc(d / f"{k}.mrc", v, 10.0) for k, v in vols.items()}


@pytest.mark.slow  # 2.3 s: renders a picture
def test_inspect_text_json_and_picture(sims, tmp_path):
    png = tmp_path / "pics" / "wedge.png"
    res = invoke_cli("inspect", sims["asym"], "--png", png, check=True)
    assert "40 x 64 x 64" in res.stdout and "voxel size: 10 A" in res.stdout
    assert "protein bright" in res.stdout and "about Y" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert [p.name for p in png.parent.iterdir()] == ["wedge.png"]  # no temporary left
    rep = json.loads(invoke_cli("inspect", sims["asym"], "--json", check=True).stdout)
    assert rep["tilt_axis"] == "Y" and rep["voxel_size"] == 10.0
    assert abs(rep["tilt_min"] + 45) < 5 and abs(rep["tilt_max"] - 65) < 5
    assert rep["shape"] == [40, 64, 64] and rep["wedge"]["reliable"] is True
    assert rep["polarity"]["protein"] == "bright" and rep["polarity"]["z"] > 10
    dark = json.loads(invoke_cli("inspect", sims["dark"], "--json", check=True).stdout)
    assert dark["polarity"]["protein"] == "dark"
    assert dark["polarity"]["z"] == pytest.approx(-rep["polarity"]["z"])
    assert dark["stats"]["mean"] == pytest.approx(-rep["stats"]["mean"], abs=1e-6)


def test_inspect_reports_swapped_axes(sims):
    rep = json.loads(invoke_cli("inspect", sims["swapped"], "--json", check=True).stdout)
    assert rep["tilt_axis"] == "Z" and rep["wedge"]["swapped_yz"] is True
    assert abs(rep["tilt_min"] + 60) < 5 and abs(rep["tilt_max"] - 60) < 5
    assert "Y and Z look swapped" in invoke_cli("inspect", sims["swapped"]).stdout


@pytest.mark.parametrize("args, words", [
    (["nothere.mrc"], "no such file"),
    (["{asym}", "--png", "out.jpg"], "*.png"),
])
def test_inspect_bad_input(sims, tmp_path, args, words):
    args = [a.format(asym=sims["asym"]) for a in args]
    res = invoke_cli("inspect", *args)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and words in lines[0]


def test_polarity_of_noise_is_unclear_and_stats_bounded():
    rng = np.random.default_rng(0)
    noise = rng.normal(3.0, 2.0, size=(40, 64, 64)).astype(np.float32)
    pol = contrast_polarity(noise, 10.0)
    assert pol.protein == "unclear" and abs(pol.z) < 4
    s = intensity_stats(noise, budget=64 * 64 * 10)  # 10 of the 40 slices
    assert s.voxels_read == 10 * 64 * 64 and s.nonfinite == 0
    assert s.mean == pytest.approx(3.0, abs=0.05) and s.std == pytest.approx(2.0, rel=0.03)
    assert s.p1 < s.mean < s.p99 and s.min < s.p1


def _warned(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "disagrees" in ln]


TILE = ["--tile", "32", "--overlap", "8", "--device", "cpu"]


@pytest.mark.slow
def test_restore_warns_on_swapped_axes(tiny_model_path, sims, tmp_path):
    """The tiny model was trained on -60..60 about Y: restoring the Y/Z-swapped tomogram
    warns once, naming the swap; the unswapped one does not."""
    ok = invoke_cli("restore", tiny_model_path, sims["sym"], "--out", tmp_path / "a.mrc",
                    *TILE, check=True)
    assert _warned(ok.stderr) == []
    bad = invoke_cli("restore", tiny_model_path, sims["swapped"], "--out",
                     tmp_path / "b.mrc", *TILE, check=True)
    warned = _warned(bad.stderr)
    assert len(warned) == 1 and "swapped" in warned[0] and "swapped.mrc" in warned[0]


@pytest.mark.slow  # 14 s: a 2-step training run, then a 2-sample family
def test_train_uses_the_estimate_and_sample_warns_on_swapped(sims, tmp_path):
    """No tilt range given: train says it uses the estimate and trains on it; sample on
    the Y/Z-swapped tomogram warns once, naming the swap."""
    run = tmp_path / "run"
    res = invoke_cli("train", sims["sym"], "--out", run, "--device", "cpu", "--patch-size",
                     "16", "--batch-size", "2", "--steps", "2", "--divergence", "none",
                     "--no-family", check=True)
    assert "estimated from the tomogram's Fourier power" in res.stderr
    assert _warned(res.stderr) == []
    from cryowae.models.checkpoint import load_restorer

    geo = load_restorer(run).geometry
    assert abs(geo.tilt_min + 60) < 5 and abs(geo.tilt_max - 60) < 5 and geo.axis == "y"
    fam = invoke_cli("sample", run, sims["swapped"], "--out", tmp_path / "fam", "--n", "2",
                     "--sampler", "rotations", *TILE, check=True)
    warned = _warned(fam.stderr)
    assert len(warned) == 1 and "swapped" in warned[0]
