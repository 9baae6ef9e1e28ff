"""Tests of cryowae.divergences: numbers measured, not just shapes."""

from __future__ import annotations

import ctypes
import gc
import math

import numpy as np
import pytest
import torch

from cryowae.divergences import (
    DIVERGENCES,
    IMQ_SCALES,
    AdversarialDivergence,
    CodeBank,
    GaussianPrior,
    ReferencePrior,
    aggregate_with_bank,
    build_divergence,
    divergence_options,
    mmd_blockwise,
    mmd_dense,
    prefers_prior,
    random_directions,
    sliced_wasserstein,
)
from cryowae.errors import CryowaeInputError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many small kernels: on a shared 2-core machine two intra-op
    threads made them up to 20x slower (measured), so use one and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _wae_paper_mmd(sample_qz: np.ndarray, sample_pz: np.ndarray, sigma2_p: float) -> float:
    """Line-by-line numpy transcription of tolstikhin/wae ``mmd_penalty``, kernel 'IMQ'."""
    n = sample_qz.shape[0]
    nf = float(n)
    zdim = sample_qz.shape[1]
    norms_pz = np.sum(np.square(sample_pz), axis=1, keepdims=True)
    dotprods_pz = sample_pz @ sample_pz.T
    distances_pz = norms_pz + norms_pz.T - 2.0 * dotprods_pz
    norms_qz = np.sum(np.square(sample_qz), axis=1, keepdims=True)
    dotprods_qz = sample_qz @ sample_qz.T
    distances_qz = norms_qz + norms_qz.T - 2.0 * dotprods_qz
    dotprods = sample_qz @ sample_pz.T
    distances = norms_qz + norms_pz.T - 2.0 * dotprods
    cbase = 2 * zdim * sigma2_p
    stat = 0.0
    for scale in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]:
        c = cbase * scale
        res1 = c / (c + distances_qz)
        res1 += c / (c + distances_pz)
        res1 = res1 * (1.0 - np.eye(n))
        res1 = np.sum(res1) / (nf * nf - nf)
        res2 = c / (c + distances)
        res2 = np.sum(res2) * 2.0 / (nf * nf)
        stat += res1 - res2
    return float(stat)


# ------------------------------------------------------------------------------------ MMD


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_imq_mmd_matches_wae_paper_formula(sigma):
    g = _gen(1)
    qz = 0.8 * sigma * torch.randn(300, 16, generator=g, dtype=torch.float64) + 0.3 * sigma
    pz = sigma * torch.randn(300, 16, generator=g, dtype=torch.float64)
    ref = _wae_paper_mmd(qz.numpy(), pz.numpy(), sigma**2)
    dense = mmd_dense(qz, pz, scale=sigma)
    block = mmd_blockwise(qz, pz, scale=sigma, block_size=128)
    assert ref > 0.01  # a real difference, not a null
    assert abs(float(dense) - ref) < 1e-12
    assert abs(float(block) - ref) < 1e-12
    # float32 inputs: still within 1e-6 of the float64 paper formula
    d32 = mmd_dense(qz.float(), pz.float(), scale=sigma)
    b32 = mmd_blockwise(qz.float(), pz.float(), scale=sigma, block_size=128)
    assert abs(float(d32) - ref) < 1e-6
    assert abs(float(b32) - ref) < 1e-6


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_blockwise_equals_dense_values_and_gradients(kernel):
    g = _gen(2)
    # n, m not multiples of the block (100), and n != m
    x = (0.7 * torch.randn(437, 64, generator=g) + 0.2).requires_grad_()
    y = torch.randn(313, 64, generator=g).requires_grad_()
    vd = mmd_dense(x, y, kernel=kernel)
    gxd, gyd = torch.autograd.grad(vd, (x, y))
    vb = mmd_blockwise(x, y, kernel=kernel, block_size=100)
    gxb, gyb = torch.autograd.grad(vb, (x, y))
    assert vb.dtype == torch.float32
    assert abs(vd.item() - vb.item()) < 1e-6
    scale_x = float(gxd.abs().max())
    assert scale_x > 1e-6
    assert float((gxd - gxb).abs().max()) < 1e-4 * scale_x
    assert float((gyd - gyb).abs().max()) < 1e-4 * float(gyd.abs().max())
    # float64: agreement to rounding
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    vd = mmd_dense(x64, y64, kernel=kernel)
    g_d = torch.autograd.grad(vd, (x64, y64))
    vb = mmd_blockwise(x64, y64, kernel=kernel, block_size=100)
    g_b = torch.autograd.grad(vb, (x64, y64))
    assert abs(vd.item() - vb.item()) < 1e-13
    for a, b in zip(g_d, g_b, strict=True):
        assert float((a - b).abs().max()) < 1e-15


@pytest.mark.slow(seconds=2)  # measured on this 2-core machine; keeps test-fast under a minute
def test_blockwise_gradcheck_small():
    g = _gen(3)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for kernel in ("imq", "rbf"):
        assert torch.autograd.gradcheck(
            lambda a, b, k=kernel: mmd_blockwise(a, b, kernel=k, block_size=3), (x, y)
        )


def test_blockwise_only_needed_grads_and_no_grad_path():
    g = _gen(4)
    x = torch.randn(50, 4, generator=g, requires_grad=True)
    y = torch.randn(60, 4, generator=g)  # prior sample: no grad
    v = mmd_blockwise(x, y, block_size=16)
    v.backward()
    assert x.grad is not None and y.grad is None
    with torch.no_grad():
        v2 = mmd_blockwise(x, y, block_size=16)
    assert not v2.requires_grad and v2.item() == pytest.approx(v.item(), abs=1e-7)


def _vm_hwm_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_mib(fn) -> float:
    """Rise of the peak RSS during ``fn()`` in MiB (freed memory returned to the OS)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # fixed M_MMAP_THRESHOLD: large blocks are unmapped on free
    gc.collect()
    libc.malloc_trim(0)
    if not _reset_peak():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs) here")
    base = _vm_hwm_kb()
    fn()
    return (_vm_hwm_kb() - base) / 1024


@pytest.mark.slow
def test_blockwise_memory_is_linear():
    """8,192 codes x 64: one dense N x N float32 matrix would be 256 MiB."""
    n, d = 8192, 64
    g = _gen(5)
    x = torch.randn(n, d, generator=g).requires_grad_()
    y = torch.randn(n, d, generator=g)
    # the measurement sees a dense matrix (calibration): 2048^2 float32 = 16 MiB
    assert 15 < _peak_mib(lambda: torch.ones(2048, 2048).sum()) < 20

    def run():  # the RBF kernel: same tiles and buffers as IMQ, fewer scales to compute
        mmd_blockwise(x, y, kernel="rbf", block_size=512).backward()

    peak = _peak_mib(run)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # measured 31 MiB: 512 x 512 tiles plus the (N, d) float64 gradient accumulators
    assert peak < 64, f"blockwise MMD used {peak:.0f} MiB above baseline"
    assert peak < n * n * 4 / 2**20 / 4  # a quarter of ONE dense N x N float32 matrix


def test_rbf_gives_no_gradient_to_far_outliers_imq_does():
    """WAE paper: the RBF kernel 'fails to penalize the outliers of Q_Z'."""
    d = 16
    g = _gen(6)
    x = torch.randn(256, d, generator=g)
    u = torch.randn(4, d, generator=g)
    x[:4] = 40.0 * u / u.norm(dim=1, keepdim=True)  # 4 codes at 40 sigma
    y = torch.randn(256, d, generator=g)

    def grad_norms(kernel, scales=None):
        xx = x.clone().requires_grad_()
        (gr,) = torch.autograd.grad(mmd_dense(xx, y, kernel=kernel, scales=scales), xx)
        norms = gr.norm(dim=1)
        return float(norms[:4].mean()), float(norms[4:].mean())

    imq_out, imq_in = grad_norms("imq")
    rbf_out, rbf_in = grad_norms("rbf")  # paper's single bandwidth sigma_k^2 = 2 d sigma^2
    # measured: IMQ 1.4e-6 on outliers (0.7 % of the inliers' 1.8e-4); RBF 1.2e-14
    assert imq_out > 1e-6 and imq_out / imq_in > 5e-3
    assert rbf_out < 1e-12 and rbf_out / rbf_in < 1e-9
    # the multi-scale RBF sum reaches out as far as its widest bandwidth (20 d sigma^2)
    rbfm_out, _ = grad_norms("rbf", IMQ_SCALES)
    assert rbfm_out > 1e-6


# ------------------------------------------------------------- all divergences, shifts


def _shift_series(name: str, **opts) -> tuple[float, list[float]]:
    d, n = 8, 512
    prior = GaussianPrior(d)
    div = build_divergence(name, d, prior, **opts)
    g = _gen(7)
    x = prior.sample(n, g)
    same = float(div(x, x.clone()))
    y = prior.sample(n, g)
    e = torch.zeros(d)
    e[0] = 1.0
    vals = [float(div(x + s * e, y)) for s in (0.0, 0.5, 1.0, 2.0)]
    return same, vals


@pytest.mark.parametrize(
    "name,opts,tol_same,ratio",
    [
        # U-statistic of x against itself: -2 (k(0) - mean k) / n, k(0) = number of scales
        ("mmd", {}, 2 * 7 / 512, 100),
        ("mmd", {"kernel": "rbf"}, 2 / 512, 100),
        ("mmd", {"implementation": "dense"}, 2 * 7 / 512, 100),
        # debiased: 0 for identical clouds; independent samples carry OT's sample bias
        ("sinkhorn", {"blur": 1.0}, 1e-5, 4),
        ("sliced", {"n_projections": 64}, 1e-12, 20),
    ],
)
def test_divergence_zero_for_identical_and_grows_with_shift(name, opts, tol_same, ratio):
    """Shifts of 0, 0.5, 1, 2 sigma between two independent samples (d=8, n=512)."""
    same, vals = _shift_series(name, **opts)
    assert abs(same) <= tol_same
    assert all(b > a for a, b in zip(vals, vals[1:], strict=False)), vals
    assert vals[3] > ratio * abs(vals[0]), vals


@pytest.mark.slow  # 2.3 s: POT reference
def test_sliced_matches_pot_equal_and_unequal_counts():
    ot = pytest.importorskip("ot")
    g = _gen(8)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    for m in (300, 211):
        y = 0.5 + 1.3 * torch.randn(m, 10, generator=g, dtype=torch.float64)
        proj = random_directions(10, 50, _gen(9), dtype=torch.float64)
        ours = float(sliced_wasserstein(x, y, projections=proj, squared=False))
        ref = float(ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), projections=proj.numpy()))
        assert ours == pytest.approx(ref, rel=1e-10)


def test_sliced_fresh_directions_per_call_and_gradient():
    prior = GaussianPrior(16)
    div = build_divergence("sliced", 16, prior, n_projections=8, seed=3)
    g = _gen(10)
    x = prior.sample(100, g).requires_grad_()
    y = prior.sample(80, g)
    v1, v2 = div(x, y), div(x, y)
    assert v1.item() != v2.item()  # new directions each call
    v1.backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    again = build_divergence("sliced", 16, prior, n_projections=8, seed=3)
    assert again(x, y).item() == v1.item()  # reproducible by seed


def test_sinkhorn_gradients_finite_and_scale_normalized():
    d = 8
    g = _gen(11)
    x = torch.randn(200, d, generator=g)
    y = torch.randn(200, d, generator=g)
    p1, p3 = GaussianPrior(d, 1.0), GaussianPrior(d, 3.0)
    d1 = build_divergence("sinkhorn", d, p1, blur=1.0)
    d3 = build_divergence("sinkhorn", d, p3, blur=1.0)
    xx = (x + 0.5).requires_grad_()
    v = d1(xx, y)
    v.backward()
    assert torch.isfinite(xx.grad).all() and float(xx.grad.abs().sum()) > 0
    # the same configuration scaled by 3 gives the same dimensionless value
    assert d3(3 * (x + 0.5), 3 * y).item() == pytest.approx(v.item(), rel=1e-4)


def test_sinkhorn_rejects_low_scaling():
    with pytest.raises(CryowaeInputError, match="scaling"):
        build_divergence("sinkhorn", 8, scaling=0.5)


@pytest.mark.slow  # 3.8 s: discriminator training
def test_adversarial_penalty_grows_with_shift_after_discriminator_training():
    """The unstable baseline: log 2 at the optimum for matched clouds, more when shifted."""
    d, n = 8, 256
    prior = GaussianPrior(d)
    e = torch.zeros(d)
    e[0] = 1.0
    pens = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        div = build_divergence("adversarial", d, prior, hidden=64, layers=2, lr=1e-3, seed=0)
        g = _gen(12)
        for _ in range(150):
            div.discriminator_step(prior.sample(n, g) + shift * e, prior.sample(n, g))
        zq = (prior.sample(n, g) + shift * e).requires_grad_()
        pen = div(zq, prior.sample(n, g))
        div.adversary.optimizer.zero_grad(set_to_none=True)
        pen.backward()
        assert torch.isfinite(zq.grad).all()
        # the encoder's backward must not touch the discriminator's gradients
        assert all(p.grad is None for p in div.adversary.discriminator.parameters())
        pens.append(pen.item())
    # measured: 0.693, 0.775, 1.06, 2.17
    assert abs(pens[0] - math.log(2)) < 0.05, pens
    assert pens[0] < pens[1] < pens[2] < pens[3], pens
    assert pens[3] > 2.5 * pens[0]


@pytest.mark.slow
def test_adversarial_discriminator_loss_decreases():
    adv = AdversarialDivergence(4, hidden=32, layers=2, lr=1e-3, seed=1)
    g = _gen(13)
    losses = []
    for _ in range(200):
        zq = torch.randn(128, 4, generator=g) + 3.0  # 6 sigma away from the prior
        losses.append(adv.discriminator_step(zq, torch.randn(128, 4, generator=g)))
    assert losses[0] > 1.2 and losses[-1] < 0.15  # measured 1.40 -> 0.076


def test_none_divergence_is_zero_with_graph():
    div = build_divergence("none", 4)
    z = torch.randn(10, 4, requires_grad=True)
    v = div(z, torch.randn(10, 4))
    v.backward()
    assert v.item() == 0.0 and float(z.grad.abs().sum()) == 0.0


@pytest.mark.slow(seconds=2)  # measured on this 2-core machine; keeps test-fast under a minute
def test_every_registered_divergence_builds_and_backpropagates():
    for name in DIVERGENCES:
        div = build_divergence(name, 6)
        z = torch.randn(40, 6, requires_grad=True)
        v = div(z, torch.randn(40, 6))
        assert v.ndim == 0
        v.backward()
        assert z.grad is not None
        assert (div.discriminator_step(z.detach(), torch.randn(40, 6)) is None) == (
            name != "adversarial"
        )


def test_unknown_divergence_name_and_option():
    with pytest.raises(CryowaeInputError) as err:
        build_divergence("kl", 8)
    for valid in DIVERGENCES:
        assert valid in str(err.value)
    with pytest.raises(CryowaeInputError, match="n_projections"):
        build_divergence("mmd", 8, n_projections=3)
    with pytest.raises(CryowaeInputError, match="kernel"):
        build_divergence("mmd", 8, kernel="laplace")
    with pytest.raises(CryowaeInputError, match="dimension"):
        build_divergence("mmd", 8, GaussianPrior(4))
    assert "block_size" in divergence_options("mmd")


# --------------------------------------------------------------------------------- priors


def test_gaussian_prior_sampling():
    p = GaussianPrior(32, sigma=2.0)
    z = p.sample(4000, _gen(14))
    assert z.shape == (4000, 32) and z.dtype == torch.float32
    assert float(z.std()) == pytest.approx(2.0, rel=0.02)
    assert torch.equal(z, p.sample(4000, _gen(14)))
    assert p.scale == 2.0


def test_reference_prior_resamples_codes():
    codes = 3.0 * torch.randn(50, 8, generator=_gen(15)) + 1.0
    p = ReferencePrior.from_codes(codes)
    assert p.scale == pytest.approx(float(codes.double().var(0).mean().sqrt()))
    z = p.sample(500, _gen(16))
    assert z.shape == (500, 8)
    # every draw is one of the reference codes (with replacement: repeats)
    assert bool((z[:, None, :] == codes[None]).all(-1).any(1).all())
    assert len({tuple(r.tolist()) for r in z}) < 500
    pj = ReferencePrior(codes, jitter=0.1)
    zj = pj.sample(500, _gen(16))
    off = torch.cdist(zj, codes).min(dim=1).values
    assert 0 < float(off.mean()) < 0.1 * p.scale * math.sqrt(8) * 1.5
    with pytest.raises(CryowaeInputError):
        ReferencePrior(torch.zeros(10, 3))


# ----------------------------------------------------------------------------------- bank


def test_code_bank_fifo_and_aggregate():
    bank = CodeBank(capacity=5)
    assert len(bank) == 0
    z = torch.arange(12, dtype=torch.float32).reshape(4, 3)  # rows 0..3
    bank.push(z)
    assert len(bank) == 4 and torch.equal(bank.codes(), z)
    bank.push(z[:3] + 100)  # 3 more -> 7 > 5: the two oldest (rows 0, 1) drop out
    assert len(bank) == 5
    expected = torch.cat([z[2:], z[:3] + 100])
    assert torch.equal(bank.codes(), expected)
    big = torch.randn(9, 3, generator=_gen(17))
    bank.push(big)  # more than capacity: only the newest 5 remain
    assert torch.equal(bank.codes(), big[-5:])

    zb = (torch.randn(2, 3, generator=_gen(18)) + 7.0).requires_grad_()
    plain = aggregate_with_bank(zb, bank.codes(), center=False)
    assert plain.shape == (7, 3)
    assert torch.equal(plain[:2], zb) and torch.equal(plain[2:], big[-5:])
    centred = aggregate_with_bank(zb, bank.codes())
    # the bank keeps its spread but takes the batch's mean
    assert torch.allclose(centred[2:].mean(0), zb.mean(0), atol=1e-5)
    assert torch.allclose(centred[2:] - centred[2:].mean(0), big[-5:] - big[-5:].mean(0),
                          atol=1e-5)
    centred.pow(2).sum().backward()
    assert zb.grad is not None and zb.grad.shape == (2, 3)
    assert aggregate_with_bank(zb, torch.empty(0, 0)) is zb
    bank.push(zb)
    assert not bank.codes().requires_grad


def test_code_bank_state_dict_roundtrip():
    bank = CodeBank(capacity=6)
    for k in range(4):
        bank.push(torch.full((2, 4), float(k)))  # 8 pushed, 6 kept, wrapped
    state = bank.state_dict()
    other = CodeBank(capacity=6)
    other.load_state_dict(state)
    assert torch.equal(other.codes(), bank.codes())
    assert other.codes()[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    other.push(torch.full((1, 4), 9.0))
    assert other.codes()[:, 0].tolist() == [1, 2, 2, 3, 3, 9]


# --------------------------------------------------------------------- prefers the prior


@pytest.mark.slow
def test_prefers_prior_passes_for_mmd_at_1024_codes_d64():
    prior = GaussianPrior(64)
    res = prefers_prior(build_divergence("mmd", 64, prior), prior, 1024, n_seeds=5)
    # measured: contracted ~ +350, shifted ~ +46 null spreads
    assert res.passed and res.checked
    assert res.separation_contracted > 100
    assert res.separation_shifted > 20
    assert res.message.startswith("prefers-prior PASS")


@pytest.mark.slow
def test_prefers_prior_detects_sinkhorn_failure_at_1024_codes_d64():
    """With the squared cost, Sinkhorn ranks the contracted cloud below the null."""
    prior = GaussianPrior(64)
    div = build_divergence("sinkhorn", 64, prior, p=2)  # blur 4 sigma, squared cost
    res = prefers_prior(div, prior, 1024, n_seeds=3)
    # measured: contracted 0.743 vs null 0.894 +- 0.025 (-6.1 null spreads); shifted +19.6.
    # blur 1 sigma was worse: contracted 29.6 vs null 39.2 +- 0.16 (-60 null spreads).
    assert res.checked and not res.passed
    assert res.contracted < res.null_mean
    assert res.separation_contracted < -3
    assert res.separation_shifted > 10
    assert "closer than a fresh prior sample" in res.message


@pytest.mark.slow
def test_prefers_prior_sinkhorn_default_cost_passes_at_1024_codes_d64():
    """The default cost |x - y| (energy-distance limit) fixes the failure above, and a
    collapsed cloud (what the squared cost let training produce) scores far above the
    null."""
    prior = GaussianPrior(64)
    div = build_divergence("sinkhorn", 64, prior)
    res = prefers_prior(div, prior, 1024, n_seeds=3)
    assert res.checked and res.passed, res.message
    assert res.separation_contracted > 20 and res.separation_shifted > 20
    g = _gen(23)
    collapsed = 0.05 * torch.randn(1024, 64, generator=g)
    assert float(div(collapsed, prior.sample(1024, g))) > 10 * res.null_mean


def test_prefers_prior_sliced_and_not_applicable():
    prior = GaussianPrior(16)
    res = prefers_prior(build_divergence("sliced", 16, prior), prior, 512, n_seeds=5)
    assert res.passed
    for name in ("none", "adversarial"):
        r = prefers_prior(build_divergence(name, 16, prior), prior, 512)
        assert not r.checked and not r.passed and "not applicable" in r.message


def test_prefers_prior_with_reference_prior():
    codes = 0.5 * torch.randn(400, 16, generator=_gen(19)) + 2.0
    prior = ReferencePrior(codes, jitter=0.05)
    res = prefers_prior(build_divergence("mmd", 16, prior), prior, 512, n_seeds=5)
    assert res.passed, res.message
