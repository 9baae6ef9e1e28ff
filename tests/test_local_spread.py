"""Local spread (cryowae.sampling.local_spread) and the self-check without ground truth
(cryowae.sampling.selfcheck), on small cases whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.metrics.calibration import spread_skill
from cryowae.metrics.sparsification import gaussian_smooth, sparsification
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling import local_spread as ls
from cryowae.sampling.selfcheck import self_check
from cryowae.training.noise import NoiseSpectrum

GEO = TiltGeometry.from_range(-60.0, 60.0)


def _filter(v: torch.Tensor, transfer: torch.Tensor) -> torch.Tensor:
    shape = tuple(v.shape[-3:])
    return torch.fft.irfftn(torch.fft.rfftn(v, dim=(-3, -2, -1), norm="ortho") * transfer,
                            s=shape, dim=(-3, -2, -1), norm="ortho")


def _blobs(shape: tuple[int, int, int], gen: torch.Generator, x_from: int) -> torch.Tensor:
    """Gaussian blobs (radius 2 voxels) with centres at X >= x_from + 3: empty ice left."""
    grids = torch.meshgrid(*[torch.arange(n).float() for n in shape], indexing="ij")
    out = torch.zeros(shape)
    lo = torch.tensor([4.0, 4.0, x_from + 3.0])
    span = torch.tensor([shape[0] - 8.0, shape[1] - 8.0, shape[2] - x_from - 7.0])
    for _ in range(14):
        c = lo + torch.rand(3, generator=gen) * span
        out += torch.exp(-sum((g - ci) ** 2 for g, ci in zip(grids, c, strict=True)) / 8.0)
    return out


def test_settings_are_validated() -> None:
    from cryowae.errors import CryowaeInputError

    with pytest.raises(CryowaeInputError):
        ls.LocalSpreadSettings(window_sigma=0.0)
    with pytest.raises(CryowaeInputError):
        ls.LocalSpreadSettings(max_gain=0.5)
    with pytest.raises(CryowaeInputError):
        ls.LocalSpreadSettings(exponent=-1.0)
    with pytest.raises(CryowaeInputError):
        ls.LocalSpreadSettings(feature_sigma=float("nan"))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(CryowaeInputError, match="total_weight"):
            ls.LocalSpreadSettings(total_weight=bad)


def test_feature_weighs_the_measured_and_the_total_power() -> None:
    """A wave along X lies in the measured region (F = P), one along Z in the missing
    wedge (F = 0): H = F^(1 - a) P^a is F for a = 0, P for a = 1 and their geometric
    mean between; the in-memory feature equals the powers it combines."""
    shape = (16, 8, 16)
    z = torch.arange(shape[0]).double()[:, None, None].expand(shape)
    x = torch.arange(shape[2]).double()[None, None, :].expand(shape)
    along_x = torch.cos(2 * math.pi * 3 * x / shape[2]).float()
    along_z = torch.cos(2 * math.pi * 3 * z / shape[0]).float()
    for wave, measured in ((along_x, 0.5), (along_z, 0.0)):
        for a, want in ((0.0, measured), (0.5, math.sqrt(measured * 0.5)), (1.0, 0.5)):
            h = ls.local_feature(wave, GEO, ls.LocalSpreadSettings(total_weight=a))
            assert float(h.mean()) == pytest.approx(want, abs=1e-4), (a, measured)
    f = torch.full(shape, 4.0, dtype=torch.float64)
    p = torch.full(shape, 9.0, dtype=torch.float64)
    got = ls.combine_powers(f, p, ls.LocalSpreadSettings(total_weight=0.5))
    np.testing.assert_allclose(got, 6.0)


def test_gain_keeps_total_variance_and_sets_the_variance_to_the_error_model() -> None:
    """A family whose per-voxel variance varies at random (1 to 4) and a measured power
    4x larger at X >= 10: after the step every voxel's variance is k F^b, b = 1 (ratio
    4 between the halves, no trace of the family's own pattern), b = 0.5 (ratio 2), the
    total and the mean kept (a wide clip: 6 samples leave some voxels' variance small
    enough for the default clip to bite)."""
    gen = torch.Generator().manual_seed(1)
    shape = (12, 16, 20)
    fam = torch.randn((6, *shape), generator=gen) * (1.0 + torch.rand(shape, generator=gen))
    feature = torch.ones(shape, dtype=torch.float64)
    feature[:, :, 10:] = 4.0
    for b, want in ((1.0, 4.0), (0.5, 2.0)):
        st = ls.LocalSpreadSettings(exponent=b, max_gain=50.0)
        out = ls.modulate(fam, fam.mean(0), ls.local_gain(feature, ls.family_variance(fam), st))
        before, after = ls.family_variance(fam), ls.family_variance(out)
        assert float(after.sum()) == pytest.approx(float(before.sum()), rel=1e-5)
        assert torch.allclose(out.mean(0), fam.mean(0), atol=1e-5)
        left, right = after[:, :, :10], after[:, :, 10:]
        assert float(left.std() / left.mean()) < 1e-4 and float(right.std() / right.mean()) < 1e-4
        assert float(right.mean() / left.mean()) == pytest.approx(want, rel=1e-4)


def test_measured_power_is_the_measured_components_local_power() -> None:
    """A plane wave along Z lies in the missing wedge (no measured power), one along X
    in the measured region (power = its mean square, 1/2 for unit amplitude); the
    volume's mean does not count."""
    shape = (16, 16, 16)
    z, _, x = torch.meshgrid(*[torch.arange(n).double() for n in shape], indexing="ij")
    along_z = 3.0 + torch.cos(2 * math.pi * 4 * z / 16)
    along_x = 3.0 + torch.cos(2 * math.pi * 4 * x / 16)
    assert float(ls.measured_power(along_z, GEO).abs().max()) < 1e-6
    assert float(ls.measured_power(along_x, GEO).mean()) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("axis", ["y", "x"])
def test_measured_square_by_blocks_of_planes_equals_the_3d_filter(axis, monkeypatch) -> None:
    geo = TiltGeometry.from_range(-50.0, 65.0, axis)
    shape = (12, 10, 14)
    r = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    f = torch.fft.rfftn(r - r.mean()) * geo.wedge_mask(shape, rfft=True)
    want = torch.fft.irfftn(f, s=shape) ** 2
    monkeypatch.setattr(ls, "BLOCK_BYTES", 8 * 12 * 14 * 3)  # blocks of 3 planes
    got = ls.measured_square(r.numpy(), geo, np.empty(shape, np.float64))
    assert np.allclose(got, want.numpy(), rtol=1e-4, atol=1e-6 * float(want.max()))


def test_per_shell_calibration_survives_the_local_step() -> None:
    """Truth error = sqrt(v(x)) x stationary coloured noise; the family's deviations are
    stationary with the same spectrum (calibrated per shell, not locally). Modulated by
    g^2 ~ v, every shell's spread/skill stays about 1 and the local spread/skill of the
    two halves comes to about 1 (by construction 1.58 and 0.79 before)."""
    gen = torch.Generator().manual_seed(2)
    shape = (32, 32, 32)
    k = radial_frequency(shape, rfft=True)
    colour = 1.0 / (1.0 + (k / 0.12) ** 2)
    v = torch.ones(shape, dtype=torch.float64)
    v[:, :, 16:] = 4.0
    v = gaussian_smooth(v, 3.0)
    v = v / v.mean()
    truth = v.sqrt().float() * _filter(torch.randn(shape, generator=gen), colour)
    fam = _filter(torch.randn((16, *shape), generator=gen), colour)
    mean = fam.mean(0)
    truth = truth + mean
    g = ls.local_gain(v, ls.family_variance(fam))
    out = ls.modulate(fam, mean, g)
    for family in (fam, out):
        per_shell = spread_skill(family, truth, GEO).ratio_per_shell("measured")
        mid = per_shell[2:14]
        assert np.all((mid > 0.8) & (mid < 1.25)), mid

    def local(family: torch.Tensor, sl: slice) -> float:
        spread = (17 / 16) * family[..., sl].var(dim=0).sum()
        return float((spread / (family.mean(0) - truth)[..., sl].square().sum()).sqrt())

    left, right = slice(0, 12), slice(20, 32)
    assert local(fam, left) > 1.4 and local(fam, right) < 0.9  # sqrt(1/0.4), sqrt(1/1.6)
    assert 0.8 < local(out, left) < 1.25 and 0.8 < local(out, right) < 1.25


@pytest.mark.slow(seconds=20)
def test_error_in_one_region_is_ranked_first_without_ground_truth() -> None:
    """Structure only at X >= 24 (empty ice left), data with a missing wedge and noise,
    a restorer that cannot fill the wedge (a Gaussian blur): its error sits on the
    structure. The localised family's std ranks the structured half first while the
    stationary family's did not."""
    gen = torch.Generator().manual_seed(0)
    shape = (32, 48, 48)
    truth = _blobs(shape, gen, 24)
    m = GEO.wedge_mask(shape, rfft=True)
    data = _filter(truth + 0.1 * torch.randn(shape, generator=gen), m)

    def restore(x: np.ndarray) -> np.ndarray:
        return gaussian_smooth(torch.as_tensor(x), 1.0).numpy()

    fam = torch.as_tensor(restore(data.numpy())) + 0.1 * torch.randn((8, *shape),
                                                                    generator=gen)
    out, info = ls.localise_family(fam, restore(data.numpy()), GEO)
    assert info["gain_range"][1] > 1.5 * info["gain_range"][0]
    std = out.std(dim=0)
    err = out.mean(0) - truth
    in_structure = (torch.arange(shape[2]) >= 24).expand(shape).flatten()
    top = std.flatten() >= std.flatten().quantile(0.9)
    assert float(in_structure[top].float().mean()) > 0.9
    # and those voxels hold more of the restoration's error than a random tenth
    assert float(err.abs().flatten()[top].mean()) > 1.5 * float(err.abs().mean())
    before = fam.std(dim=0).flatten()
    assert float(in_structure[before >= before.quantile(0.9)].float().mean()) < 0.7
    assert sparsification(std, err).gain > 0.3 > 0.1 > sparsification(fam.std(dim=0), err).gain


def _wiener_case(seed: int) -> tuple[torch.Tensor, torch.Tensor, object, NoiseSpectrum]:
    """Stationary Gaussian signal of power P(k), white noise N in the measured region;
    the restorer is the Wiener filter P / (P + N) in the measured region and 0 in the
    wedge (of whatever grid it is given). The exact posterior: variance P N / (P + N)
    per measured coefficient, P per wedge coefficient; the calibrated family is the
    restoration plus draws from it."""
    gen = torch.Generator().manual_seed(seed)
    shape = (40, 48, 48)
    noise_power = 0.5

    def power(k: torch.Tensor) -> torch.Tensor:
        return 1.0 / (1.0 + (k / 0.08) ** 2)

    k = radial_frequency(shape, rfft=True)
    m = GEO.wedge_mask(shape, rfft=True)
    truth = _filter(torch.randn(shape, generator=gen), power(k).sqrt())
    data = _filter(truth + math.sqrt(noise_power) * torch.randn(shape, generator=gen), m)

    def restore(x: np.ndarray) -> np.ndarray:
        shp = tuple(x.shape)
        kk = radial_frequency(shp, rfft=True)
        w = power(kk) / (power(kk) + noise_power) * GEO.wedge_mask(shp, rfft=True)
        return _filter(torch.as_tensor(x), w).numpy()

    post = torch.where(m > 0.5, power(k) * noise_power / (power(k) + noise_power), power(k))
    fam = torch.as_tensor(restore(data.numpy())) + _filter(
        torch.randn((16, *shape), generator=gen), post.sqrt())
    freq = np.linspace(0.0, 0.9, 10)
    noise = NoiseSpectrum(freq, np.full(10, noise_power), "known")
    return fam, data, restore, noise


@pytest.mark.slow(seconds=5)
def test_self_check_passes_a_calibrated_family_and_flags_scaled_ones() -> None:
    fam, data, restore, noise = _wiener_case(3)
    mean = fam.mean(0)
    verdicts = {}
    for scale in (1.0, 2.0, 0.5):
        scaled = mean + scale * (fam - mean)
        out = self_check(scaled, data, GEO, restore, noise)
        verdicts[scale] = out
        for region in ("measured", "wedge"):
            assert out["spread_skill"][region] == pytest.approx(scale, rel=0.15), (
                scale, region, out["spread_skill"])
    assert verdicts[1.0]["verdict"] == "agrees"
    assert not verdicts[1.0]["line"].startswith("WARNING")
    for scale, word in ((2.0, "too wide"), (0.5, "too narrow")):
        assert verdicts[scale]["verdict"] == "disagrees"
        assert verdicts[scale]["line"].startswith("WARNING") and word in verdicts[scale]["line"]


@pytest.mark.slow(seconds=20)
def test_store_step_equals_the_in_memory_step_and_resumes(tmp_path) -> None:
    """`localise_store` (slab by slab, resumable) gives the in-memory family within
    float32 rounding and the slabs' halo, also when interrupted after the first
    sample's modulation and run again."""
    from cryowae.sampling.store_local_spread import localise_store

    gen = torch.Generator().manual_seed(5)
    shape = (24, 32, 32)
    truth = _blobs(shape, gen, 16)
    data = _filter(truth + 0.1 * torch.randn(shape, generator=gen),
                   GEO.wedge_mask(shape, rfft=True))

    def restore(x: np.ndarray) -> np.ndarray:
        return gaussian_smooth(torch.as_tensor(x), 1.0).numpy()

    centre = restore(data.numpy())
    fam = (torch.as_tensor(centre) + 0.1 * torch.randn((4, *shape), generator=gen)).numpy()
    st = ls.LocalSpreadSettings(feature_sigma=1.5)
    want, _ = ls.localise_family(fam, centre, GEO, st)
    store = fam.copy()
    state: dict = {}
    calls = {"n": 0}

    def interrupted() -> None:
        calls["n"] += 1
        if state.get("modulated") == 0 and not state.get("done"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        localise_store(store, centre, GEO, state, interrupted, tmp_path, st)
    info = localise_store(store, centre, GEO, state, lambda: None, tmp_path, st)
    assert state["done"] == [0, 1, 2, 3]
    assert np.allclose(store, want.numpy(), atol=2e-3 * float(np.abs(fam - centre).max()))
    assert info["settings"]["feature_sigma"] == 1.5
    assert not list(tmp_path.glob("local_*.npy"))
