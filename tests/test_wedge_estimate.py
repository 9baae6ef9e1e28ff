"""The wedge self-check: tilt axis and range from a tomogram's own spectrum, the
warnings that name the likely cause, and the estimate in the geometry chain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryowae.io import write_mrc, write_tilt_angles
from cryowae.physics.geometry import TiltGeometry, estimate_mismatch
from cryowae.physics.wedge import apply_wedge
from cryowae.physics.wedge_estimate import estimate_wedge, spectrum_warning
from cryowae.progress import ProgressReporter
from cryowae.simulation import SimulationConfig, simulate_tomogram

#: 40x64x64 noisy tomograms (default dose 120 e/A^2, 3-degree steps)
SIM = dict(size=64, voxel_size=10.0, seed=1)
CASES = {"symmetric": (-60.0, 60.0, "y"), "asymmetric": (-45.0, 65.0, "y"),
         "x-axis": (-50.0, 58.0, "x")}


def _sim(tilt_min: float, tilt_max: float, axis: str, **kw) -> np.ndarray:
    cfg = SimulationConfig(**(SIM | kw), tilt_min=tilt_min, tilt_max=tilt_max,
                           tilt_axis=axis)
    return simulate_tomogram(cfg)["tomo"].numpy()


class Recorder(ProgressReporter):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def log(self, message: str) -> None:
        self.messages.append(message)


@pytest.mark.parametrize("case", list(CASES))
def test_estimate_on_simulated_tomograms(case):
    lo, hi, axis = CASES[case]
    est = estimate_wedge(_sim(lo, hi, axis))
    # measured: symmetric -60.9..61.3, asymmetric -45.8..63.6, X axis -51.1..59.3
    assert est.axis == axis and not est.swapped and est.reliable
    assert abs(est.tilt_min - lo) < 5 and abs(est.tilt_max - hi) < 5
    assert est.separation > 0.6 and est.decades > 3  # measured 0.83, 5.1-5.5
    others = [v for k, v in est.separation_by_axis.items() if k != axis]
    assert max(others) < 0.4  # measured at most 0.21


def test_estimate_with_y_and_z_swapped():
    """An IMOD reconstruction that was not rotated: (Y, Z, X) in the file. The wedge
    lies in the file's YX plane; the warning names the swap."""
    swapped = np.ascontiguousarray(_sim(-60.0, 60.0, "y").transpose(1, 0, 2))
    est = estimate_wedge(swapped)
    assert est.axis == "z" and est.swapped and est.reliable
    assert abs(est.tilt_min + 60) < 5 and abs(est.tilt_max - 60) < 5
    assert est.to_dict()["tilt_axis"] == "Z"
    msg = spectrum_warning(swapped, TiltGeometry(-60.0, 60.0, "y", "options"), "t.mrc")
    assert msg is not None and "swapped" in msg and "IMOD" in msg
    assert "\n" not in msg and msg.startswith("warning: t.mrc:")


@pytest.mark.parametrize("axis", ["y", "x"])
def test_sign_convention_follows_wedge_mask(axis):
    """White noise with the wedge of -45..65 removed by `apply_wedge` is estimated as
    -45..65, not its mirror -65..45."""
    g = torch.Generator().manual_seed(0)
    vol = apply_wedge(torch.randn(48, 64, 64, generator=g), -45.0, 65.0, axis)
    est = estimate_wedge(vol.numpy())
    assert est.axis == axis  # measured: -45.6..64.9 about Y, -45.7..65.6 about X
    assert abs(est.tilt_min + 45) < 3 and abs(est.tilt_max - 65) < 3


def test_no_wedge_is_not_reliable(tmp_path):
    """White noise and a noise-free ground truth show no missing wedge; the geometry
    chain then falls back to the default."""
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(40, 64, 64, generator=g).numpy()
    gt = simulate_tomogram(SimulationConfig(**SIM))["gt"].numpy()
    for vol in (noise, gt):
        est = estimate_wedge(vol)
        assert not est.reliable and est.separation < 0.25  # measured 0.001 and 0.15
        assert spectrum_warning(vol, TiltGeometry(-30.0, 30.0, "x")) is None
    assert not estimate_wedge(np.ones((16, 16, 16), np.float32)).reliable
    write_mrc(tmp_path / "noise.mrc", noise, 10.0)
    geo = TiltGeometry.resolve(tomogram=tmp_path / "noise.mrc", estimate=True)
    assert geo.source == "default" and geo.tilt_range == (-60.0, 60.0)


def test_resolve_uses_the_estimate_after_tilt_files(tmp_path):
    path = tmp_path / "tomo.mrc"
    write_mrc(path, _sim(-45.0, 65.0, "y"), 10.0)
    geo = TiltGeometry.resolve(tomogram=path, estimate=True)
    assert geo.source.startswith("estimated") and geo.axis == "y"
    assert abs(geo.tilt_min + 45) < 5 and abs(geo.tilt_max - 65) < 5
    assert TiltGeometry.resolve(tomogram=path).source == "default"  # only when asked
    write_tilt_angles(tmp_path / "tomo.tlt", np.arange(-40.0, 41.0, 4.0))
    geo = TiltGeometry.resolve(tomogram=path, estimate=True)
    assert geo.tilt_range == (-40.0, 40.0) and geo.source.startswith("tilt file")


def test_mismatch_names_the_likely_cause():
    est = estimate_wedge(_sim(-45.0, 65.0, "y"))
    opts = "options"
    assert estimate_mismatch(TiltGeometry(-50.0, 60.0, "y", opts), est) is None
    cases = {
        (-65.0, 45.0, "y", opts): "mirrored",
        (-0.7854, 1.1345, "y", opts): "radians",  # -45..65 degrees in radians
        (-45.0, 65.0, "x", opts): "--tilt-axis y",
        (-60.0, 60.0, "y", opts): "differs by",
        (-60.0, 60.0, "y", "model"): "the model was trained on another tilt range",
    }
    for args, words in cases.items():
        msg = estimate_mismatch(TiltGeometry(*args), est, "a.mrc")
        assert msg is not None and words in msg and "\n" not in msg, (args, msg)


def test_training_sources_warn_once_per_disagreeing_tomogram(tmp_path):
    from cryowae.training.data import load_sources

    a, b = tmp_path / "a.mrc", tmp_path / "b.mrc"
    vol = _sim(-60.0, 60.0, "y")
    write_mrc(a, vol, 10.0)
    write_mrc(b, np.ascontiguousarray(vol.transpose(1, 0, 2)), 10.0)
    rec = Recorder()
    load_sources([a, b], min_size=16, geometry=TiltGeometry(-60.0, 60.0, "y", "options"),
                 progress=rec)
    assert len(rec.messages) == 1 and "b.mrc" in rec.messages[0]
    assert "swapped" in rec.messages[0]
