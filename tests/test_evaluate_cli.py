"""`cryowae evaluate` end to end: in-process through the real entry point, and once in a
subprocess (`python -m cryowae`)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryowae.io import write_mrc, write_tilt_angles
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.wedge import apply_wedge

from .conftest import invoke_cli, run_cli

KEYS = ("pearson", "psnr_db", "fsc_0143_A", "fsc_05_A", "cc_measured", "cc_wedge")
SHAPE = (24, 32, 40)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A smooth ground truth and its wedge-masked noisy copy, written at 10 A
    (the copy with another intensity scale, as another program would write it)."""
    d = tmp_path_factory.mktemp("eval")
    g = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(0))
    keep = radial_frequency(SHAPE, rfft=True) <= 0.3
    gt = torch.fft.irfftn(torch.fft.rfftn(g) * keep, s=SHAPE)
    noise = torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1))
    restored = 250.0 * (apply_wedge(gt, -50.0, 50.0) + 0.05 * noise) + 1000.0
    write_mrc(d / "gt.mrc", gt.numpy(), 10.0)
    write_mrc(d / "restored.mrc", restored.numpy(), 10.0)
    return d / "restored.mrc", d / "gt.mrc"


@pytest.mark.slow  # a real `python -m cryowae` process
def test_evaluate_json(pair, tmp_path):
    restored, gt = pair
    out = tmp_path / "report.json"
    # the one real process of this file: the installed entry point end to end
    proc = run_cli("evaluate", restored, "--gt", gt, "--tilt-min", "-50", "--tilt-max", "50",
                   "--json", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 1  # exactly one JSON object
    rep = json.loads(proc.stdout)
    for key in KEYS:
        assert isinstance(rep[key], float) and math.isfinite(rep[key]), key
    assert rep["cc_measured"] > 0.95
    assert abs(rep["cc_wedge"]) < 0.2
    assert rep["pearson"] > 0.5
    assert 20.0 <= rep["fsc_0143_A"] <= rep["fsc_05_A"]
    assert rep["voxel_size_A"] == 10.0 and rep["nyquist_A"] == 20.0
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_axis"]) == (-50.0, 50.0, "y")
    assert rep["tilt_source"] == "options" and "warnings" not in rep
    assert rep["restored"] == str(restored) and rep["gt"] == str(gt)
    assert rep["shape"] == list(SHAPE)
    assert len(rep["fsc"]) == min(SHAPE) // 2
    assert all(len(p) == 2 and p[0] > 0 for p in rep["fsc"])
    assert json.loads(out.read_text()) == rep


def test_evaluate_identical_volumes(pair):
    _, gt = pair
    proc = invoke_cli("evaluate", gt, "--gt", gt, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["pearson"] == pytest.approx(1.0)
    assert rep["psnr_db"] is None  # infinite: JSON null
    assert rep["fsc_0143_A"] == pytest.approx(20.0) and rep["fsc_05_A"] == pytest.approx(20.0)
    assert rep["cc_measured"] == pytest.approx(1.0) and rep["cc_wedge"] == pytest.approx(1.0)


def test_evaluate_table(pair):
    restored, gt = pair
    proc = invoke_cli("evaluate", restored, "--gt", gt, "--tilt-min", "-50", "--tilt-max", "50")
    assert proc.returncode == 0, proc.stderr
    for word in ("Pearson", "PSNR", "FSC 0.143", "CC wedge"):
        assert word in proc.stdout


def _bad_inputs(d: Path, gt: Path) -> dict[str, list]:
    (d / "text.mrc").write_text("not an MRC file at all\n")
    nan = np.zeros(SHAPE, np.float32)
    nan[3, 4, 5] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN
        with mrcfile.new(d / "nan.mrc", overwrite=True) as m:
            m.set_data(nan)
            m.voxel_size = 10.0
    write_mrc(d / "other_shape.mrc", np.zeros((SHAPE[0], SHAPE[1], SHAPE[2] + 2), np.float32),
              10.0)
    return {
        "missing file": [d / "absent.mrc", "--gt", gt],
        "missing gt": [gt, "--gt", d / "absent.mrc"],
        "not MRC": [d / "text.mrc", "--gt", gt],
        "NaN volume": [d / "nan.mrc", "--gt", gt],
        "shape mismatch": [d / "other_shape.mrc", "--gt", gt],
        "tilt-min >= tilt-max": [gt, "--gt", gt, "--tilt-min", "40", "--tilt-max", "40"],
        "unknown option": [gt, "--gt", gt, "--frobnicate"],
        "bad tilt axis": [gt, "--gt", gt, "--tilt-axis", "z"],
        "missing tilt file": [gt, "--gt", gt, "--tilt-file", d / "absent.tlt"],
        "--normals with --gt": [gt, "--gt", gt, "--normals", d / "absent.npy"],
    }


@pytest.mark.parametrize("case", [
    "missing file", "missing gt", "not MRC", "NaN volume", "shape mismatch",
    "tilt-min >= tilt-max", "unknown option", "bad tilt axis", "missing tilt file",
    "--normals with --gt",
])
def test_evaluate_bad_input_exits_2_with_one_line(pair, tmp_path, case):
    _, gt = pair
    args = _bad_inputs(tmp_path, gt)[case]
    proc = invoke_cli("evaluate", *args, "--json")
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryowae: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def _evaluate_json(*args) -> tuple[dict, str]:
    proc = invoke_cli("evaluate", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def test_evaluate_reads_tilt_files(pair, tmp_path):
    """A .tlt next to the restored tomogram, then one next to the ground truth, then
    --tilt-file: each sets the wedge (and the report says which); none: -60..60 and a
    warning."""
    restored, gt = pair
    d = tmp_path / "r"
    d.mkdir()
    moved = d / "restored.mrc"
    moved.write_bytes(restored.read_bytes())
    rep, err = _evaluate_json(moved, "--gt", gt)
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_source"]) == (-60.0, 60.0, "default")
    assert "assuming -60..60" in err and len(rep["warnings"]) == 1
    cc_default = rep["cc_measured"]

    write_tilt_angles(d / "restored.tlt", np.arange(-50.0, 51.0, 2.0))
    rep, err = _evaluate_json(moved, "--gt", gt)
    assert (rep["tilt_min"], rep["tilt_max"]) == (-50.0, 50.0) and err == ""
    assert rep["tilt_source"] == f"tilt file {d / 'restored.tlt'}"
    # the restoration's wedge is -50..50: -60..60 counts part of it as measured
    assert rep["cc_measured"] > cc_default + 0.05  # 0.994 vs 0.882

    other = tmp_path / "g"
    other.mkdir()
    gt2 = other / "gt.mrc"
    gt2.write_bytes(gt.read_bytes())
    write_tilt_angles(other / "tilts.tlt", [-40.0, 0.0, 45.0])
    (d / "restored.tlt").unlink()
    rep, _ = _evaluate_json(moved, "--gt", gt2, "--tilt-axis", "X")
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_axis"]) == (-40.0, 45.0, "x")
    assert rep["tilt_source"] == f"tilt file {other / 'tilts.tlt'}"

    explicit = tmp_path / "mine.rawtlt"
    write_tilt_angles(explicit, [-30.0, 10.0, 35.0])
    rep, _ = _evaluate_json(moved, "--gt", gt2, "--tilt-file", explicit)
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_axis"]) == (-30.0, 35.0, "y")
