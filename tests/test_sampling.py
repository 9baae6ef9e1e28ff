"""Posterior families on the tile engine: coherent samples, reproducibility, resume,
bounded memory, the consistency check, the CLI (sample and evaluate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io import read_mrc, read_ome_zarr, write_mrc
from cryowae.models.checkpoint import LoadedRestorer
from cryowae.models.restorer import RestorerConfig
from cryowae.models.stochastic import StochasticConfig, StochasticRestorer
from cryowae.physics.geometry import TiltGeometry
from cryowae.physics.wedge import apply_wedge
from cryowae.progress import Cancelled, ProgressReporter
from cryowae.sampling import (
    aligned_plan,
    consistency_check,
    cube_rotations,
    plan_family,
    rotate_cube,
    sample_array,
    sample_file,
)
from cryowae.sampling.settings import SamplerSettings
from cryowae.tiling.settings import TileSettings

from .conftest import MMAP_ENV, cancel_after, invoke_cli

GEO = TiltGeometry(-60.0, 60.0, "y", "model")


def _settings(n: int, sampler: str = "prior", tile: int = 16, overlap: int = 8,
              seed: int = 0, group: int | None = None) -> SamplerSettings:
    return SamplerSettings(n, sampler, TileSettings(tile, overlap), seed, group)


def stochastic_restorer(seed: int = 0, zero_branch: bool = False) -> LoadedRestorer:
    """A small random stochastic restorer (depth 2: multiple 4) wrapped for inference."""
    torch.manual_seed(seed)
    m = StochasticRestorer(StochasticConfig(restorer=RestorerConfig(4, 2, 8),
                                            latent_channels=2, branch_channels=4,
                                            posterior=False)).eval()
    if zero_branch:
        with torch.no_grad():
            m.branch.head.weight.zero_()
    return LoadedRestorer(model=m.mean, voxel_size=10.0, norm=(0.0, 1.0), geometry=GEO,
                          patch_size=16, codes=torch.zeros(0, 8), train_config={},
                          stochastic=m)


def _smooth(shape, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    return torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2)[0, 0].numpy()


def _tomogram(shape=(24, 40, 36), seed=0) -> np.ndarray:
    x = apply_wedge(torch.from_numpy(_smooth(shape, seed) * 5)).numpy()
    x = x + 0.05 * np.random.default_rng(seed + 1).normal(size=shape).astype(np.float32)
    return (3.0 * x + 7.0).astype(np.float32)


# ------------------------------------------------------------------ plans, rotations
def test_aligned_plan_starts_are_multiples_and_cover_the_volume():
    plan = aligned_plan(TileSettings(16, 6), (24, 70, 37), 4)
    for a in plan.axes:
        assert all(s % 4 == 0 for s in a.starts)
        assert a.starts[-1] + a.tile <= a.extent
        assert a.weight_sum().min() > 0  # every real voxel is covered
    cubic = aligned_plan(TileSettings(16, 6), (8, 40, 40), 4, cubic=True)
    assert len(set(cubic.tile)) == 1


def test_cube_rotations_exact_and_invertible():
    rots = cube_rotations()
    assert len(rots) == 24 and np.array_equal(rots[0], np.eye(3))
    assert len({r.tobytes() for r in rots}) == 24
    v = torch.randn(2, 1, 6, 6, 6)
    for r in rots:
        assert torch.equal(rotate_cube(rotate_cube(v, r), r, inverse=True), v)


# ------------------------------------------------------------------ samples
@pytest.mark.slow
def test_zero_branch_sampling_equals_restoration():
    """With the branch's head zeroed every sample is the mean path's restoration, and
    where the aligned plan equals restore's plan, sampling equals `restore_array`."""
    from cryowae.inference.restore import restore_array

    r = stochastic_restorer(zero_branch=True)
    x = _tomogram((32, 64, 64))
    settings = TileSettings(32, 16)
    assert aligned_plan(settings, x.shape, 4) == settings.plan(x.shape, 4)
    fam = sample_array(r, x, _settings(2, tile=32, overlap=16))
    ref = restore_array(r, x, tile=32, overlap=16)
    np.testing.assert_allclose(fam.samples[0], ref, atol=1e-5)
    np.testing.assert_allclose(fam.samples[1], ref, atol=1e-5)
    assert float(fam.std.max()) < 1e-5


@pytest.mark.slow
def test_samples_reproducible_and_independent_of_family_size_and_grouping():
    r, x = stochastic_restorer(), _tomogram((16, 24, 28))
    a = sample_array(r, x, _settings(3))
    assert a.info["samples_per_pass"] == 3
    b = sample_array(r, x, _settings(5, group=1))
    np.testing.assert_allclose(a.samples, b.samples[:3], atol=1e-5)
    c = sample_array(r, x, _settings(3, seed=1))
    assert np.abs(a.samples - c.samples).max() > 10 * 1e-5
    assert float(np.abs(a.samples[0] - a.samples[1]).mean()) > 1e-3  # samples differ
    np.testing.assert_allclose(a.mean, a.samples.mean(0), atol=1e-5)
    np.testing.assert_allclose(a.std, a.samples.std(0), atol=1e-5)


def test_branch_channels_last_gives_the_same_samples():
    """--channels-last: the branch's weights in channels_last_3d, the same family up to
    float32 rounding (the samples' deviations from the mean agree to 1e-5 of their
    RMS), recorded in the plan's description; the default layout is left as it was."""
    x = _tomogram((16, 24, 28))
    a = sample_array(stochastic_restorer(), x, _settings(3))
    r = stochastic_restorer()
    b = sample_array(r, x, SamplerSettings(3, "prior", TileSettings(16, 8), 0,
                                           channels_last=True))
    head = r.stochastic.branch.blocks[-1].conv1.weight
    assert head.is_contiguous(memory_format=torch.channels_last_3d)
    assert not head.is_contiguous()
    # the mean path (the restoration, the centre) keeps its layout
    assert all(p.is_contiguous() for p in r.stochastic.mean.parameters())
    dev = a.samples - a.mean
    rms = float(np.sqrt(np.mean(dev**2)))
    assert rms > 1e-3  # the samples differ, so the comparison says something
    assert float(np.abs((b.samples - b.mean) - dev).max()) < 1e-3 * rms
    assert float(np.sqrt(np.mean(((b.samples - b.mean) - dev) ** 2))) < 1e-5 * rms
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    assert b.info["branch_channels_last"] is True
    assert a.info["branch_channels_last"] is False
    with pytest.raises(CryowaeInputError, match="channels_last"):
        SamplerSettings(3, channels_last="yes")


def test_overlapping_tiles_of_one_sample_agree():
    """Two overlapping tiles decode one sample alike: the field-driven part (sample
    minus mean path) agrees in the middle of their overlap, far better than with
    independent fields."""
    r = stochastic_restorer()
    fp = plan_family(r, (16, 16, 96), _settings(2, tile=64, overlap=32))
    ax = fp.plan.axes[2]
    assert len(ax.starts) >= 2
    x = torch.from_numpy(_smooth((16, 16, 96)) * 3)
    refs = []
    tiles = []
    from cryowae.tiling.engine import TileRef

    for k in (0, 1):
        xs = ax.starts[k]
        idx = [fp.plan.axes[a].real_indices(fp.plan.axes[a].starts[0]) for a in (0, 1)]
        tiles.append(x[np.ix_(idx[0], idx[1], ax.real_indices(xs))])
        refs.append(TileRef((0, 0, k), (0, 0, xs), ((0, 16), (0, 16), ax.real_range(xs))))
    batch = torch.stack(tiles)[:, None]
    out = fp.source.tile_fn([0, 1])(batch, refs)
    with torch.inference_mode():
        mean = r.stochastic.mean(batch)[0]
    part = out - mean  # (2 tiles, 2 samples, ...)
    lo, hi = ax.starts[1] + 4, ax.starts[0] + ax.tile - 4  # padded coordinates
    a = part[0, :, 4:-4, 4:-4, lo - ax.starts[0]:hi - ax.starts[0]]
    b = part[1, :, 4:-4, 4:-4, lo - ax.starts[1]:hi - ax.starts[1]]
    rms = float(a.square().mean().sqrt())
    same = float((a - b).square().mean().sqrt()) / rms
    independent = float((a[0] - b[1]).square().mean().sqrt()) / rms
    assert same < 0.1 and independent > 0.5, (same, independent)


def test_sampler_errors():
    r, x = stochastic_restorer(), _tomogram((16, 16, 16))
    plain = LoadedRestorer(model=r.model, voxel_size=10.0, norm=(0.0, 1.0), geometry=GEO,
                           patch_size=16, codes=torch.zeros(0, 8), train_config={})
    with pytest.raises(CryowaeInputError, match="no stochastic branch"):
        sample_array(plain, x, _settings(2, overlap=4))
    with pytest.raises(CryowaeInputError, match="at most 24"):
        sample_array(plain, x, _settings(25, "rotations", overlap=4))
    with pytest.raises(CryowaeInputError, match="unknown --sampler"):
        sample_array(r, x, _settings(2, "ot", overlap=4))
    with pytest.raises(CryowaeInputError, match="check, none"):
        sample_array(r, x, _settings(2, overlap=4), consistency="hard")
    rot = sample_array(plain, x, _settings(3, "rotations", overlap=4))
    assert rot.samples.shape == (3, 16, 16, 16)
    ens = sample_array([plain, r], x, _settings(2, "ensemble", overlap=4))
    assert ens.samples.shape[0] == 2


# ------------------------------------------------------------------ consistency check
def test_consistency_check_flags_a_family_that_carries_the_measured_noise():
    shape = (48, 48, 48)
    truth = apply_wedge(torch.from_numpy(_smooth(shape, 3) * 4)).numpy()
    rng = np.random.default_rng(4)
    even = truth + rng.normal(size=shape).astype(np.float32)
    odd = truth + rng.normal(size=shape).astype(np.float32)
    data = 0.5 * (even + odd)
    smooth = [_smooth(shape, 10 + i) for i in range(4)]
    wedge_part = np.stack([v - apply_wedge(torch.from_numpy(v)).numpy() for v in smooth])
    copies = data[None] + 0.1 * wedge_part  # keeps the data's noise
    denoised = truth[None] + 0.1 * wedge_part
    bad = consistency_check(copies, data, GEO, even, odd)
    good = consistency_check(denoised, data, GEO, even, odd)
    assert bad["ratio_high"] < 0.5 and "carry the measured noise" in bad["verdict"]
    assert 0.7 < good["ratio_high"] < 1.4 and "consistent" in good["verdict"]
    est = consistency_check(denoised, data, GEO)  # noise estimated without halves
    assert 0.5 < est["ratio_high"] < 2.0


# ------------------------------------------------------------------ files


@pytest.mark.slow
def test_sample_file_resume_equals_uninterrupted(tmp_path):
    r = stochastic_restorer()
    tomo = tmp_path / "tomo.mrc"
    # centred on 0: float16 holds it (`float16_fits`), as it does real tomograms
    write_mrc(tomo, _tomogram() - 7.0, voxel_size=10.0, origin=(1.0, 2.0, 3.0))
    kw = dict(sampling=_settings(3, group=1))
    whole = sample_file(r, tomo, tmp_path / "whole", **kw)
    fp = plan_family(r, (24, 40, 36), _settings(3))
    out = tmp_path / "resumed"
    with pytest.raises(Cancelled):
        sample_file(r, tomo, out, progress=cancel_after(fp.plan.n_tiles + 2), **kw)
    assert not out.exists()
    state = json.loads((tmp_path / ".resumed.partial" / "state.json").read_text())
    assert state["done"] == [0]
    log = ProgressReporter()
    messages = []
    log.log = messages.append  # type: ignore[method-assign]
    sample_file(r, tomo, out, progress=log, **kw)
    assert any("1 of 3 samples already done" in m for m in messages)
    a, b = read_ome_zarr(whole / "samples.zarr"), read_ome_zarr(out / "samples.zarr")
    assert b.data.dtype == np.float16  # the default storage
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    for name in ("mean.mrc", "std.mrc"):
        np.testing.assert_array_equal(read_mrc(whole / name).numpy(),
                                      read_mrc(out / name).numpy())
    meta = json.loads((out / "family.json").read_text())
    assert meta["n_samples"] == 3 and meta["geometry"]["tilt_min"] == -60.0
    assert meta["consistency"]["per_shell"] and meta["consistency"]["spread"]["wedge"] > 0
    mean = read_mrc(out / "mean.mrc")
    assert mean.voxel_size == pytest.approx(10.0)
    stored = np.asarray(b.data, np.float32)  # float16 rounds by 2^-11 of the value
    np.testing.assert_allclose(mean.numpy(), stored.mean(0),
                               atol=2.0 ** -10 * float(np.abs(stored).max()))
    with pytest.raises(CryowaeInputError, match="exists"):
        sample_file(r, tomo, out, **kw)


MEMORY_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    import cryowae.sampling.wedge_ratio as wr
    # the calibration's wedge ratio reads 4 patches per batch whatever their number:
    # 8 patches instead of 64 hold the same working set (its time is fixed, not its
    # memory: 22 of the test's 63 s at 64 patches)
    wr.wedge_ratio = functools.partial(wr.wedge_ratio, n_patches=8)
    from cryowae.io import write_mrc
    from cryowae.models.checkpoint import LoadedRestorer
    from cryowae.models.restorer import RestorerConfig
    from cryowae.models.stochastic import StochasticConfig, StochasticRestorer
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.physics.wedge_estimate import spectrum_warning
    from cryowae.sampling import sample_file
    from cryowae.sampling.settings import SamplerSettings
    from cryowae.tiling.settings import TileSettings

    src, out, warm = sys.argv[1:4]
    m = StochasticRestorer(StochasticConfig(restorer=RestorerConfig(4, 2, 8),
                                            latent_channels=2, branch_channels=4,
                                            posterior=False)).eval()
    geometry = TiltGeometry(-60.0, 60.0, "y", "model")
    r = LoadedRestorer(model=m.mean, voxel_size=10.0, norm=(0.0, 1.0), geometry=geometry,
                       patch_size=16, codes=torch.zeros(0, 8), train_config={}, stochastic=m)
    kw = dict(sampling=SamplerSettings(2, tiles=TileSettings(48, 8, 2)))
    rng = np.random.default_rng(0)
    # pay the fixed working sets first: the network and the allocator's pools, the
    # check's 96^3 crops (a 96-slice warm-up family) and the wedge self-check's 128^3
    # crop (measured: that crop alone was the 13-20 MB "growth" when the warm-up was
    # thinner than 128 slices)
    write_mrc(warm, rng.normal(size=(96, 128, 128)).astype("f4"), 10.0)
    sample_file(r, warm, out + "_warm", **kw)
    # a second warm-up family: the first leaves 20-30 MB of heap behind (allocator
    # pools, caches) that a single warm-up's peak did not yet include, measured 5-12 MB
    # of "growth" on the volume below whatever its size; after the second, 0.0-0.1 MB
    sample_file(r, warm, out + "_warm2", **kw)
    spectrum_warning(rng.normal(size=(128, 128, 128)).astype("f4"), geometry, "warm-up")
    def peak():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))
    base = peak()
    sample_file(r, src, out, **kw)
    print(json.dumps({"base": base, "during": peak()}))
""")
#: peak RSS growth allowed while sampling the 16 MiB memory-mapped tomogram below
#: (glibc returning every allocation over 1 MiB at once, so RSS follows what is live;
#: at 4 MiB the 3.5 MB arrays of the calibration's 96^3 crop, SURE's restorations of
#: it, stayed in the heap and fragmented it: 14.4 MB measured). The run keeps 2 slab
#: buffers, a slab of input pages, a few batches of tiles and the fixed crops of the
#: checks and the calibration, all paid by the warm-ups: measured growth 0.0-0.1 MB.
#: A float32 copy of the input held through the calibration measured 14.2 MB of growth
#: (its 16.8 MB less the peak's headroom), a full-size float64 accumulator more.
MEMORY_BOUND = 6 << 20


@pytest.mark.slow(seconds=170)  # measured in the suite on this 2-core machine
def test_sample_file_memory_bounded_on_memory_mapped_volume(tmp_path):
    from cryowae.io import open_mrc_writer

    shape = (256, 128, 128)  # 16 MiB of float32
    src = tmp_path / "big.mrc"
    with open_mrc_writer(src, shape, 10.0) as mm:
        rng = np.random.default_rng(0)
        for z in range(0, shape[0], 16):
            mm[z:z + 16] = rng.normal(size=(16, *shape[1:])).astype(np.float32)
    assert int(np.prod(shape)) * 4 > 2 * MEMORY_BOUND  # 16 MiB input, 6 MiB bound
    env = {**os.environ, **MMAP_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(src),
                           str(tmp_path / "fam"), str(tmp_path / "warm.mrc")],
                          capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = m["during"] - m["base"]
    print(f"peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < MEMORY_BOUND, f"peak RSS grew by {growth / 1e6:.1f} MB"
    calibration = json.loads((tmp_path / "fam" / "family.json").read_text())
    assert calibration["spread_calibration"]["estimate"]["wedge_ratio"]["patches"] <= 8


# ------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_cli_sample_and_evaluate_with_tlt(tiny_model_path, tmp_path):
    """Rotations of the identity model (no stochastic branch), a .tlt file for sample
    and evaluate, and the family calibration report."""
    gt = _smooth((16, 32, 32), 7) * 3
    tomo = apply_wedge(torch.from_numpy(gt), -50, 50).numpy() + 0.05 * np.random.default_rng(
        8).normal(size=gt.shape).astype(np.float32)
    write_mrc(tmp_path / "tomo.mrc", tomo.astype(np.float32), voxel_size=10.0)
    write_mrc(tmp_path / "gt.mrc", gt.astype(np.float32), voxel_size=10.0)
    (tmp_path / "angles.tlt").write_text("\n".join(str(a) for a in range(-50, 51, 10)))
    fam = tmp_path / "fam"
    res = invoke_cli("sample", tiny_model_path, tmp_path / "tomo.mrc", "--n", "3",
                     "--sampler", "rotations", "--tile", "16", "--overlap", "4", "--out",
                     fam, "--tilt-file", tmp_path / "angles.tlt")
    assert res.returncode == 0, res.stderr
    assert "consistency check" in res.stdout and "spread per Fourier" in res.stdout
    meta = json.loads((fam / "family.json").read_text())
    assert meta["geometry"]["tilt_min"] == -50.0 and meta["geometry"]["tilt_max"] == 50.0
    res = invoke_cli("evaluate", fam, "--gt", tmp_path / "gt.mrc", "--json", "--restored",
                     tmp_path / "tomo.mrc", "--tilt-file", tmp_path / "angles.tlt")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["geometry"]["tilt_min"] == -50.0
    assert rep["spread_skill"]["spread_skill_wedge"] >= 0
    assert 0 <= rep["coverage"]["all_90"] <= 1 and rep["coverage"]["lowpass_A"] == 30.0
    assert "crps_family" in rep["crps"] and "pearson" in rep["family_mean"]
    res = invoke_cli("evaluate", fam, "--gt", tmp_path / "gt.mrc")
    assert res.returncode == 0 and "spread/skill" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ot"], "unknown --sampler"),
    (["--consistency", "hard"], "unknown --consistency"),
    (["--even", "x.mrc"], "both --even and --odd"),
    ([], "no stochastic branch"),
    (["--spread-calibration", "wide"], "unknown spread calibration"),
    (["--spread-calibration", "halves"], "needs --even and --odd"),
])
def test_cli_sample_errors(tiny_model_path, tmp_path, args, message):
    write_mrc(tmp_path / "tomo.mrc", _tomogram((16, 16, 16)), voxel_size=10.0)
    res = invoke_cli("sample", tiny_model_path, tmp_path / "tomo.mrc", "--out",
                     tmp_path / "fam", *args)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_evaluate_family_options_need_a_family(tmp_path):
    write_mrc(tmp_path / "a.mrc", _tomogram((16, 16, 16)), voxel_size=10.0)
    res = invoke_cli("evaluate", tmp_path / "a.mrc", "--gt", tmp_path / "a.mrc",
                     "--restored", tmp_path / "a.mrc")
    assert res.returncode == 2 and "for a family directory" in res.stderr
