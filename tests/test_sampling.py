"""Posterior families: OT plan, data consistency, spread in the wedge, output layout, CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.io import read_mrc, read_ome_zarr, write_mrc
from cryowae.models.checkpoint import load_restorer, save_restorer
from cryowae.physics.wedge import apply_wedge, wedge_mask
from cryowae.progress import ProgressReporter
from cryowae.sampling import (
    OTCodeSampler,
    SamplingCancelled,
    effective_codes,
    entropic_plan,
    fourier_region_energy,
    measured_fsc,
    noise_std_from_halves,
    prepare_consistency,
    sample_array,
    sample_file,
)
from cryowae.sampling.ot_sampler import absolute_eps, cube_rotations, rotate_cube

from .conftest import run_cli


def _randomised_model(path: Path, seed: int = 0, latent_dim: int = 8) -> Path:
    """A tiny restorer whose FiLM generators and output head are random, so the code
    changes the restoration (the identity-at-init fixture ignores its code)."""
    from cryowae.models.restorer import RestorerConfig, WAERestorer
    from cryowae.training.config import TrainConfig

    torch.manual_seed(seed)
    cfg = TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, latent_dim))
    model = WAERestorer(cfg.restorer)
    with torch.no_grad():
        for lin in model.film:
            lin.weight.normal_(0.0, 0.5)
            lin.bias.normal_(0.0, 0.1)
        model.head.weight.normal_(0.0, 0.3)
    save_restorer(path, model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(64, latent_dim))
    return path


@pytest.fixture(scope="module")
def rand_model(tmp_path_factory) -> Path:
    return _randomised_model(tmp_path_factory.mktemp("rand_model") / "model.pt")


def _synthetic_tomogram(shape=(24, 32, 32), seed=0) -> np.ndarray:
    """Smooth random structure seen through a -60..60 wedge, plus a little noise, on an
    offset intensity scale."""
    rng = np.random.default_rng(seed)
    v = torch.from_numpy(rng.normal(size=shape).astype(np.float32))[None, None]
    v = torch.nn.functional.avg_pool3d(v, 5, stride=1, padding=2)[0, 0]
    x = apply_wedge(v * 5).numpy() + 0.05 * rng.normal(size=shape).astype(np.float32)
    return (3.0 * x + 7.0).astype(np.float32)


def _sim_tomogram(request) -> tuple[np.ndarray, str]:
    """The simulated tomogram of the `small_sim` fixture when the simulator exists,
    otherwise a synthetic wedge-limited volume."""
    if importlib.util.find_spec("cryowae.cli.simulate") is None:
        return _synthetic_tomogram((32, 48, 48)), "synthetic"
    try:
        sim = request.getfixturevalue("small_sim")
    except Exception:  # simulator present but failing: not this module's concern
        return _synthetic_tomogram((32, 48, 48)), "synthetic"
    cands = sorted(p for p in Path(sim).rglob("*")
                   if p.suffix in (".mrc", ".zarr") and "tomo" in p.name.lower()
                   and not any(k in p.name.lower() for k in ("even", "odd", "gt", "truth")))
    if not cands:
        return _synthetic_tomogram((32, 48, 48)), "synthetic"
    from cryowae.io import read_volume

    return read_volume(cands[0]).numpy(), str(cands[0])


# ------------------------------------------------------------------------- OT plan
def test_plan_rows_are_distributions_and_cost_convention():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen) * 0.8 + 0.2
    y = torch.randn(50, 6, generator=gen)
    eps = absolute_eps(0.5, 6, 1.0)
    p = entropic_plan(x, y, eps)
    assert p.plan.shape == (40, 50)
    assert (p.plan >= 0).all()
    np.testing.assert_allclose(p.plan.sum(1).numpy(), 1 / 40, rtol=1e-5)
    np.testing.assert_allclose(p.plan.sum(0).numpy(), 1 / 50, rtol=2e-3)
    cond = p.conditionals()
    np.testing.assert_allclose(cond.sum(1).numpy(), 1.0, rtol=1e-5)
    # primal OT_eps(a, b) = <pi, C> + eps KL(pi | a x b) with C = |x - y|^2 / 2 must equal
    # GeomLoss's own (dual) value: this pins its cost convention.
    from geomloss import SamplesLoss

    pi = p.plan.double()
    c = torch.cdist(x.double(), y.double()).square() / 2
    ab = torch.full_like(pi, 1 / (40 * 50))
    primal = float((pi * c).sum() + eps * (pi * (pi / ab).log()).sum())
    value = float(SamplesLoss("sinkhorn", p=2, blur=eps**0.5, scaling=0.95, debias=False,
                              backend="tensorized")(x.double(), y.double()))
    assert primal == pytest.approx(value, rel=2e-3)


def test_smaller_epsilon_gives_fewer_effective_codes():
    gen = torch.Generator().manual_seed(1)
    train_codes = torch.randn(128, 8, generator=gen)
    tiles = torch.randn(20, 8, generator=gen) * 0.9
    means = []
    for eps in (0.05, 0.2, 1.0, 4.0):
        s = OTCodeSampler(train_codes, sigma=1.0, epsilon=eps, seed=0)
        info = s.setup(tiles)
        eff = effective_codes(s.cond)
        assert info["plan_row_error"] < 1e-4
        means.append(float(eff.mean()))
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    assert means[0] < 5 and means[-1] > 30


def test_ot_codes_are_deterministic_and_follow_the_plan():
    gen = torch.Generator().manual_seed(2)
    s = OTCodeSampler(torch.randn(64, 8, generator=gen), epsilon=0.02, seed=3)
    s.setup(torch.randn(10, 8, generator=gen))
    a, b = s.codes(0), s.codes(0)
    assert torch.equal(a, b)
    assert not torch.equal(s.codes(0), s.codes(1)) or float(effective_codes(s.cond).max()) < 1.5
    # every drawn code is one of the target codes with positive plan weight
    for i in range(10):
        j = torch.nonzero((s.target == a[i]).all(dim=1))[:, 0]
        assert len(j) >= 1 and float(s.cond[i, j].max()) > 0


def test_cube_rotations_exact_and_invertible():
    rots = cube_rotations()
    assert len(rots) == 24 and np.array_equal(rots[0], np.eye(3))
    assert len({r.tobytes() for r in rots}) == 24
    v = torch.randn(2, 1, 6, 6, 6)
    for r in rots:
        assert round(np.linalg.det(r)) == 1
        assert torch.equal(rotate_cube(rotate_cube(v, r), r, inverse=True), v)


# ------------------------------------------------------------------ consistency
def _measured_error(samples: np.ndarray, data: np.ndarray) -> float:
    m = wedge_mask(data.shape, -60, 60, rfft=True).numpy() > 0.5
    d = np.fft.rfftn(data.astype(np.float64))
    worst = 0.0
    for s in samples:
        f = np.fft.rfftn(s.astype(np.float64))
        worst = max(worst, float(np.abs(f - d)[m].max()))
    return worst / float(np.abs(d).max())


def test_hard_consistency_keeps_measured_fourier_region(rand_model):
    r = load_restorer(rand_model)
    data = _synthetic_tomogram()
    res = sample_array(r, data, n_samples=4, tile=16, overlap=4, epsilon=1.0)
    assert res.samples.shape == (4, *data.shape) and res.samples.dtype == np.float32
    assert _measured_error(res.samples, data) < 1e-6
    assert res.info["consistency"]["mode"] == "hard"
    assert float(res.std.max()) > 0  # the samples do differ (in the wedge)
    np.testing.assert_allclose(res.std, res.samples.std(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.mean, res.samples.mean(axis=0), rtol=1e-5, atol=1e-5)
    # without consistency the measured region is the network's, not the data's
    free = sample_array(r, data, n_samples=2, tile=16, overlap=4, consistency="none")
    assert _measured_error(free.samples, data) > 1e-3


def test_own_codes_without_consistency_equal_restore_array(rand_model):
    """interpolation=0 decodes every tile with its own code: the family's engine then
    reproduces `cryowae.inference.restore.restore_array` (same tiles, same blending)."""
    from cryowae.inference.restore import restore_array

    r = load_restorer(rand_model)
    data = _synthetic_tomogram((20, 28, 36))
    single = restore_array(r, data, tile=16, overlap=4, batch_size=3)
    res = sample_array(r, data, n_samples=2, tile=16, overlap=4, interpolation=0.0,
                       consistency="none")
    np.testing.assert_allclose(res.samples[0], single, rtol=1e-4, atol=1e-4)
    assert float(res.std.max()) < 1e-4


def test_spread_lives_in_the_wedge(rand_model, request):
    data, source = _sim_tomogram(request)
    r = load_restorer(rand_model)
    res = sample_array(r, data, n_samples=6, tile=16, overlap=4, epsilon=1.0)
    fig = res.info["figures"]
    ratio = fig["diff_energy_ratio_wedge_over_measured"]
    assert fig["diff_energy_wedge"] > 0
    assert ratio > 1e3, (source, fig)
    # the same figure recomputed independently from the samples
    diffs = res.samples[1:] - res.samples[:-1]
    ew, em = zip(*(fourier_region_energy(d, -60, 60) for d in diffs), strict=True)
    assert sum(ew) / max(sum(em), 1e-300) > 1e3


def test_soft_consistency_needs_halves_and_uses_the_fsc():
    data = _synthetic_tomogram()
    c = prepare_consistency(data, "soft", -60, 60)
    assert c.mode == "hard" and c.requested == "soft" and "even" in c.reason
    rng = np.random.default_rng(5)
    sig = data - data.mean()
    even = sig + rng.normal(size=data.shape).astype(np.float32)
    odd = sig + rng.normal(size=data.shape).astype(np.float32)
    fsc = measured_fsc(even, odd, -60, 60)
    assert fsc[1] > 0.8 and fsc[-1] < fsc[1]
    soft = prepare_consistency(data, "soft", -60, 60, even=even, odd=odd)
    assert soft.mode == "soft"
    w = soft.shell_weights
    assert w is not None and np.all((w >= 0) & (w <= 1))
    out = soft.apply(np.zeros_like(data))  # a blank sample takes w * data where measured
    assert 0 < np.abs(out).sum() < np.abs(data - 0).sum() * 1.01
    with pytest.raises(CryowaeInputError):
        prepare_consistency(data, "sometimes", -60, 60)


def test_noise_std_from_halves_matches_the_true_noise():
    rng = np.random.default_rng(7)
    sig = _synthetic_tomogram((20, 24, 24)) - 7.0
    ne = rng.normal(scale=0.8, size=sig.shape).astype(np.float32)
    no = rng.normal(scale=0.8, size=sig.shape).astype(np.float32)
    e, o = sig + ne, sig + no
    for full, truth in (((e + o) / 2, 0.8 / np.sqrt(2)), (e + o, 0.8 * np.sqrt(2))):
        est = noise_std_from_halves(full, e, o)
        assert est.shape == sig.shape
        assert float(np.sqrt((est**2).mean())) == pytest.approx(truth, rel=0.05)


# -------------------------------------------------------------------- samplers
def test_other_samplers_and_limits(rand_model, tmp_path):
    r = load_restorer(rand_model)
    data = _synthetic_tomogram((16, 24, 24))
    for sampler in ("gaussian", "rotations"):
        res = sample_array(r, data, n_samples=3, sampler=sampler, tile=16, overlap=4)
        assert res.samples.shape[0] == 3 and res.info["sampler"] == sampler
        assert _measured_error(res.samples, data) < 1e-6
    with pytest.raises(CryowaeInputError, match="24"):
        sample_array(r, data, n_samples=25, sampler="rotations", tile=16)
    other = load_restorer(_randomised_model(tmp_path / "m2.pt", seed=1))
    ens = sample_array([r, other], data, sampler="ensemble", tile=16, overlap=4)
    assert ens.samples.shape[0] == 2 and float(ens.std.max()) > 0
    with pytest.raises(CryowaeInputError, match="ensemble"):
        sample_array([r, other], data, sampler="ot", tile=16)
    with pytest.raises(CryowaeInputError, match="sampler"):
        sample_array(r, data, sampler="dreams", tile=16)


def test_cancel_stops_sampling(rand_model):
    class Stop(ProgressReporter):
        def advance(self, n=1, **info):
            super().advance(n, **info)
            self.cancel()

    with pytest.raises(SamplingCancelled):
        sample_array(load_restorer(rand_model), _synthetic_tomogram((16, 16, 16)),
                     n_samples=2, tile=16, overlap=4, progress=Stop())


# ---------------------------------------------------------------- files and CLI
def test_sample_file_layout(rand_model, tmp_path):
    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, _synthetic_tomogram((20, 28, 36)), 7.5)
    out = sample_file(rand_model, tomo, tmp_path / "fam", n_samples=3, tile=16, overlap=4,
                      device="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["family.json", "mean.mrc",
                                                     "samples.zarr", "std.mrc"]
    fam = read_ome_zarr(out / "samples.zarr")
    assert fam.meta["axes"] == ["s", "z", "y", "x"]
    assert tuple(fam.data.shape) == (3, 20, 28, 36) and fam.data.chunks[0] == 1
    assert fam.voxel_size == pytest.approx(7.5)
    samples = np.asarray(fam.data)
    mean, std = read_mrc(out / "mean.mrc", mmap=False), read_mrc(out / "std.mrc", mmap=False)
    assert mean.voxel_size == pytest.approx(7.5) and std.voxel_size == pytest.approx(7.5)
    np.testing.assert_allclose(std.data, samples.std(axis=0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(mean.data, samples.mean(axis=0), rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "family.json").read_text())
    assert meta["sampler"] == "ot" and meta["consistency"]["mode"] == "hard"
    assert meta["voxel_size"] == pytest.approx(7.5) and meta["std_ddof"] == 0
    assert "effective_codes_per_tile" in meta["ot"]
    with pytest.raises(CryowaeInputError, match="overwrite"):
        sample_file(rand_model, tomo, out, n_samples=2, tile=16, overlap=4)
    sample_file(rand_model, tomo, out, n_samples=2, tile=16, overlap=4, overwrite=True)
    assert read_ome_zarr(out / "samples.zarr").data.shape[0] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fam")]  # no leftovers
    # with halves: soft consistency and the data's own noise as noise_std.mrc
    rng = np.random.default_rng(1)
    base = read_mrc(tomo, mmap=False).data
    halves = []
    for name in ("even", "odd"):
        halves.append(tmp_path / f"{name}.mrc")
        write_mrc(halves[-1], base + rng.normal(size=base.shape).astype(np.float32), 7.5)
    out2 = sample_file(rand_model, tomo, tmp_path / "fam_soft", n_samples=2, tile=16,
                       overlap=4, consistency="soft", even=halves[0], odd=halves[1])
    meta = json.loads((out2 / "family.json").read_text())
    assert meta["consistency"]["mode"] == "soft" and meta["files"]["noise_std"]
    assert read_mrc(out2 / "noise_std.mrc").voxel_size == pytest.approx(7.5)


def test_cli_sample_and_bad_input(rand_model, tmp_path):
    tomo = tmp_path / "tomo.mrc"
    write_mrc(tomo, _synthetic_tomogram((16, 24, 24)), 10.0)
    out = tmp_path / "fam"
    ok = run_cli("sample", rand_model, tomo, "--n", "2", "--out", out, "--tile", "16",
                 "--overlap", "4", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert "cryowae view" in ok.stdout and (out / "samples.zarr").is_dir()
    # --consistency auto: hard without halves, soft (noise-aware) with them
    assert json.loads((out / "family.json").read_text())["consistency"]["mode"] == "hard"
    rng = np.random.default_rng(5)
    halves = []
    for name in ("even", "odd"):
        halves.append(tmp_path / f"{name}.mrc")
        write_mrc(halves[-1], read_mrc(tomo).numpy() + rng.normal(size=(16, 24, 24))
                  .astype(np.float32), 10.0)
    soft = run_cli("sample", rand_model, tomo, "--n", "2", "--out", tmp_path / "fam_auto",
                   "--tile", "16", "--overlap", "4", "--even", halves[0], "--odd", halves[1])
    assert soft.returncode == 0, soft.stderr
    meta = json.loads((tmp_path / "fam_auto" / "family.json").read_text())
    assert meta["consistency"]["mode"] == "soft"
    again = run_cli("sample", rand_model, tomo, "--n", "2", "--out", out, "--tile", "16")
    assert again.returncode == 2
    assert len(again.stderr.strip().splitlines()) == 1 and "overwrite" in again.stderr
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    bad = run_cli("sample", bogus, tomo, "--n", "2", "--out", tmp_path / "fam2")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "fam2").exists()
    bad_sampler = run_cli("sample", rand_model, tomo, "--sampler", "x", "--out",
                          tmp_path / "fam3")
    assert bad_sampler.returncode == 2 and len(bad_sampler.stderr.strip().splitlines()) == 1
