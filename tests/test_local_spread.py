"""Local spread (cryowae.sampling.local_spread) and the self-check without ground truth
(cryowae.sampling.selfcheck), on small cases whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryowae.metrics.calibration import spread_skill
from cryowae.metrics.sparsification import gaussian_smooth
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


def test_gain_keeps_total_variance_and_follows_the_error_model() -> None:
    gen = torch.Generator().manual_seed(1)
    shape = (12, 16, 20)
    fam = torch.randn((6, *shape), generator=gen) * (1.0 + torch.rand(shape, generator=gen))
    detail = torch.ones(shape, dtype=torch.float64)
    detail[:, :, 10:] = 4.0  # v = D~ (b = 1, c = 0): four times the variance at X >= 10
    model = ls.ErrorModel(a=1.0, b=1.0, c=0.0)
    st = ls.LocalSpreadSettings(window_sigma=1.0)
    g = ls.local_gain(detail, ls.family_variance(fam), model, st)
    out = ls.modulate(fam, fam.mean(0), g)
    before, after = ls.family_variance(fam).sum(), ls.family_variance(out).sum()
    assert float(after) == pytest.approx(float(before), rel=1e-5)
    assert torch.allclose(out.mean(0), fam.mean(0), atol=1e-5)
    var = gaussian_smooth(ls.family_variance(out), 1.0)
    ratio = float(var[:, :, 13:].mean() / var[:, :, :7].mean())
    assert 3.0 < ratio < 5.0


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
    st = ls.LocalSpreadSettings(window_sigma=2.0)
    g = ls.local_gain(v, ls.family_variance(fam), ls.ErrorModel(1.0, 1.0, 0.0), st)
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
    structure. The extra-wedge task sees that, the fit gives the detail power a positive
    exponent, and the localised family's std ranks the structured half first while the
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
    out, info = ls.localise_family(fam, restore, data.numpy(), GEO)
    assert info["model"]["b"] > 0.2
    assert info["model"]["score"] < info["model"]["score_flat"]
    std = out.std(dim=0)
    err = (out.mean(0) - truth).abs()
    top = std.flatten() >= std.flatten().quantile(0.8)
    in_structure = (torch.arange(shape[2]) >= 24).expand(shape).flatten()
    assert float(in_structure[top].float().mean()) > 0.9
    # and those voxels hold more of the restoration's error than a random fifth
    assert float(err.flatten()[top].mean()) > 1.3 * float(err.mean())
    top_before = fam.std(dim=0).flatten() >= fam.std(dim=0).flatten().quantile(0.8)
    assert float(in_structure[top_before].float().mean()) < 0.7


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
    """`localise_store` (slab by slab, resumable) gives the in-memory family of the
    same model within float32 rounding and the slabs' halo, also when interrupted
    after the first sample's modulation and run again."""
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
    st = ls.LocalSpreadSettings(window_sigma=2.0)
    model, _ = ls.fit_on_crop(restore, data.numpy(), GEO, st)
    x = torch.as_tensor(fam)
    want = ls.modulate(x, x.mean(0), ls.local_gain(ls.detail_power(centre, st),
                                                    ls.family_variance(x), model, st))
    store = fam.copy()
    state: dict = {}
    calls = {"n": 0}

    def interrupted() -> None:
        calls["n"] += 1
        if state.get("modulated") == 0 and not state.get("done"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        localise_store(store, centre, data.numpy(), GEO, restore, state, interrupted,
                       tmp_path, st)
    info = localise_store(store, centre, data.numpy(), GEO, restore, state, lambda: None,
                          tmp_path, st)
    assert state["done"] == [0, 1, 2, 3]
    assert np.allclose(store, want.numpy(), atol=2e-3 * float(np.abs(fam - centre).max()))
    assert info["model"]["b"] == pytest.approx(model.b, rel=1e-6)
    assert not list(tmp_path.glob("local_*.npy"))
