"""Latent code samplers: which code each subtomogram is decoded with, sample by sample.

The default, `OTCodeSampler`, follows CryoWGEN: the codes of a tomogram's subtomograms
(tiles) are an empirical sample of the aggregated posterior q_Z, which the WAE trained
towards the prior p_Z. The entropic optimal-transport plan between the two clouds,

    pi = argmin_{pi in U(a, b)}  sum_ij pi_ij C_ij  -  eps H(pi),   C_ij = |x_i - y_j|^2 / 2,

couples every tile code x_i with the prior codes y_j it could plausibly have been; row i
of the plan, normalised, is a distribution over codes for tile i. Decoding the tile
(with its own skip features) with codes drawn from that row gives restorations that
agree on what the encoder saw and differ where the code matters - in the missing wedge.
The temperature eps is the diversity knob: eps -> 0 gives a (near) deterministic
matching, one code per row; a large eps spreads each row over the whole prior sample.

How the plan is computed
------------------------
GeomLoss (``SamplesLoss("sinkhorn", p=2, blur, debias=False, potentials=True,
backend="tensorized")``) returns the dual potentials F (on x) and G (on y). Its ground
cost for p=2 is the *halved* squared distance (``cost_routines[2]`` in
``geomloss/_legacy/sinkhorn_samples.py``: ``squared_distances(x, y) / 2``) and its
temperature is ``eps = blur**p``; the primal plan is then

    pi_ij = a_i b_j exp((F_i + G_j - C_ij) / eps).

GeomLoss ends with one parallel update of F and G, so its marginals are only approximate;
a few extra log-domain Sinkhorn iterations at the final eps are run here until the
column sums are within `tol` of b, and F is finally recomputed as the soft c-transform of
G, which makes every row sum to a_i exactly (up to float rounding).

The measures
------------
* source: the tile codes, plus - when the checkpoint carries training codes - half of
  those codes as *context*. Without context a tomogram with few tiles has a plan whose
  rows are forced to be nearly the prior itself (with one tile, row = b whatever eps).
* target (`prior`): ``"gaussian"`` draws from N(0, sigma^2 I) with the training prior's
  sigma; ``"codes"`` resamples the training codes (codes the decoder has actually been
  conditioned on); ``"mixed"`` (the default when codes exist) takes half of each, the
  codes half being disjoint from the context half. Both measures are uniform and of the
  same size.

The epsilon knob
----------------
`epsilon` is relative: ``eps = epsilon * sqrt(d) * s^2`` where s is the target's scale
(sigma for a Gaussian, the rms per-coordinate std of the codes otherwise). For x, y drawn
from N(0, s^2 I) in d dimensions the cost C_ij = |x-y|^2/2 varies over j with standard
deviation about sqrt(d) s^2, so epsilon ~ 1 means "temperature comparable to the spread
of the costs a row sees", independently of d. Effective number of codes per row (exp of
the row entropy) is reported; it falls monotonically as epsilon falls.

The barycentric map x_i -> sum_j P_ij y_j (the plan's conditional mean) is one code per
tile: it gives no diversity at all and is provided only for reference.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError

PRIOR_KINDS = ("auto", "gaussian", "codes", "mixed")


# --------------------------------------------------------------------------- OT plan
@dataclass
class EntropicPlan:
    """An entropic OT plan between uniform measures on x (n, d) and y (m, d)."""

    plan: torch.Tensor  # (n, m), rows sum to 1/n, columns to 1/m
    eps: float  # absolute temperature (= blur**2)
    blur: float
    row_error: float  # max_i |sum_j pi_ij - a_i| / a_i
    col_error: float  # max_j |sum_i pi_ij - b_j| / b_j
    iterations: int  # extra Sinkhorn iterations run after GeomLoss

    def conditionals(self) -> torch.Tensor:
        """Rows normalised to probability distributions (n, m)."""
        return self.plan / self.plan.sum(dim=1, keepdim=True)


def _softmin(eps: float, cost: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """-eps * logsumexp_j (h_j - C_ij / eps), the soft c-transform (as GeomLoss)."""
    return -eps * torch.logsumexp(h[None, :] - cost / eps, dim=1)


def entropic_plan(x: torch.Tensor, y: torch.Tensor, eps: float, scaling: float = 0.9,
                  tol: float = 1e-3, max_iter: int = 200) -> EntropicPlan:
    """Entropic OT plan between the uniform measures on `x` (n, d) and `y` (m, d).

    Dual potentials come from GeomLoss (halved squared Euclidean cost, ``eps =
    blur**2``), polished by log-domain Sinkhorn iterations at `eps` until the column
    marginals are within relative `tol`; rows are then exact by construction.
    """
    from geomloss import SamplesLoss

    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise CryowaeInputError(f"codes must be (n, d) and (m, d), got {tuple(x.shape)} "
                                f"and {tuple(y.shape)}")
    if not eps > 0:
        raise CryowaeInputError(f"the entropic temperature must be positive, got {eps}")
    x = x.detach().double()
    y = y.detach().double()
    n, m = x.shape[0], y.shape[0]
    blur = math.sqrt(eps)
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=False,
                       potentials=True, backend="tensorized")
    a = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
    b = torch.full((m,), 1.0 / m, dtype=y.dtype, device=y.device)
    with torch.no_grad():
        f, g = loss(a, x, b, y)
        f, g = f.reshape(n), g.reshape(m)
        cost = torch.cdist(x, y).square() / 2  # GeomLoss's convention for p=2
        log_a, log_b = a.log(), b.log()
        it = 0
        col_err = float("inf")
        while True:
            f = _softmin(eps, cost, log_b + g / eps)  # rows exact
            log_plan = (f[:, None] + g[None, :] - cost) / eps + log_a[:, None] + log_b[None]
            col = torch.logsumexp(log_plan, dim=0)
            col_err = float((col - log_b).exp().sub(1).abs().max())
            if col_err <= tol or it >= max_iter:
                break
            g = _softmin(eps, cost.T, log_a + f / eps)
            it += 1
        plan = log_plan.exp()
        row_err = float((plan.sum(dim=1) * n - 1).abs().max())
    if not torch.isfinite(plan).all():
        raise CryowaeInputError("the OT plan has non-finite entries; try a larger --epsilon")
    return EntropicPlan(plan=plan.float(), eps=float(eps), blur=blur, row_error=row_err,
                        col_error=col_err, iterations=it)


def effective_codes(conditionals: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of a row-stochastic matrix (n, m): the number of codes a
    row effectively spreads over (1 = deterministic, m = uniform)."""
    p = conditionals.double().clamp_min(0)
    p = p / p.sum(dim=1, keepdim=True)
    ent = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(dim=1)
    return ent.exp().float()


def barycentric_map(conditionals: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plan's conditional mean code per row, sum_j P_ij y_j. One code per tile: it
    gives no diversity and is here for reference only."""
    return conditionals.to(y.dtype) @ y


# ------------------------------------------------------------------- prior / context
def restorer_prior_sigma(train_config: dict[str, Any] | None) -> float:
    return float((train_config or {}).get("prior_sigma", 1.0) or 1.0)


def codes_scale(codes: torch.Tensor) -> float:
    """sqrt(trace(Cov) / d) of a code cloud (the ReferencePrior's scale)."""
    if codes.shape[0] < 2:
        return 0.0
    return float(codes.double().var(dim=0, unbiased=True).mean().sqrt())


@dataclass
class PriorSample:
    """Target codes of the plan and the context codes that join the source."""

    target: torch.Tensor  # (m, d)
    context: torch.Tensor  # (k, d), possibly empty
    kind: str
    scale: float
    notes: list[str] = field(default_factory=list)


def build_prior_sample(dim: int, n_source_tiles: int, training_codes: torch.Tensor | None,
                       sigma: float, prior: str = "auto", n_prior: int | None = None,
                       max_context: int = 2048, generator: torch.Generator | None = None
                       ) -> PriorSample:
    """Draw the target codes (and the context codes of the source) for the OT plan.

    See the module docstring for `prior` (``auto``, ``gaussian``, ``codes``, ``mixed``).
    The target has as many points as the source (tiles + context) unless `n_prior` is
    given.
    """
    from cryowae.divergences import GaussianPrior

    if prior not in PRIOR_KINDS:
        raise CryowaeInputError(f"unknown prior {prior!r}: choose from {', '.join(PRIOR_KINDS)}")
    codes = training_codes if training_codes is not None else torch.zeros(0, dim)
    codes = codes.detach().float().cpu()
    if codes.ndim != 2 or (codes.shape[0] and codes.shape[1] != dim):
        raise CryowaeInputError(f"training codes of shape {tuple(codes.shape)} do not match "
                                f"the latent dimension {dim}")
    usable = codes.shape[0] >= 4 and torch.isfinite(codes).all() and codes_scale(codes) > 0
    notes: list[str] = []
    if prior == "auto":
        prior = "mixed" if usable else "gaussian"
    if prior in ("codes", "mixed") and not usable:
        raise CryowaeInputError(f"prior {prior!r} needs the training codes, but the model "
                                "carries none (use --prior gaussian)")
    ctx = torch.zeros(0, dim)
    pool = codes
    if usable:
        perm = torch.randperm(codes.shape[0], generator=generator)
        codes = codes[perm]
        half = codes.shape[0] // 2
        ctx, pool = codes[:min(half, max_context)], codes[half:]
    else:
        notes.append("no training codes in the model: the source measure is the tiles' "
                     "codes alone")
        if n_source_tiles < 16:
            notes.append(f"only {n_source_tiles} tile(s) and no training codes: each plan "
                         "row is close to the whole prior sample whatever epsilon")
    m = int(n_prior) if n_prior else max(n_source_tiles + ctx.shape[0], 64)
    gauss = GaussianPrior(dim, sigma)
    if prior == "gaussian":
        target, scale = gauss.sample(m, generator=generator), sigma
    else:
        n_codes = m if prior == "codes" else m // 2
        idx = torch.randint(0, pool.shape[0], (n_codes,), generator=generator)
        parts = [pool[idx]]
        if prior == "mixed":
            parts.append(gauss.sample(m - n_codes, generator=generator))
        target = torch.cat(parts)
        scale = codes_scale(pool) if prior == "codes" else sigma
    return PriorSample(target=target.float(), context=ctx.float(), kind=prior,
                       scale=float(scale), notes=notes)


def absolute_eps(epsilon: float, dim: int, scale: float) -> float:
    """eps = epsilon * sqrt(d) * scale^2 (see the module docstring)."""
    if not epsilon > 0:
        raise CryowaeInputError(f"--epsilon must be positive, got {epsilon:g}")
    return float(epsilon) * math.sqrt(dim) * float(scale) ** 2


# -------------------------------------------------------------------------- samplers
class CodeSampler(abc.ABC):
    """Chooses, for each sample, the code each tile is decoded with."""

    name = "base"

    @abc.abstractmethod
    def setup(self, tile_codes: torch.Tensor) -> dict[str, Any]:
        """Receive the tiles' own codes (n, d); return figures for the metadata."""

    @abc.abstractmethod
    def codes(self, sample: int) -> torch.Tensor:
        """(n, d) codes for sample number `sample` (deterministic given the seed)."""


class OTCodeSampler(CodeSampler):
    """Codes drawn from the rows of the entropic OT plan between tiles and prior.

    Parameters
    ----------
    training_codes
        The checkpoint's sample of training codes (may be empty).
    sigma
        The training prior's sigma.
    epsilon
        Relative entropic temperature (the diversity knob).
    interpolation
        t in [0, 1]: decode with z_i + t (y_j - z_i); 1 uses the drawn code itself.
    prior, n_prior
        Target measure (see `build_prior_sample`).
    """

    name = "ot"

    def __init__(self, training_codes: torch.Tensor | None, sigma: float = 1.0,
                 epsilon: float = 0.5, interpolation: float = 1.0, prior: str = "auto",
                 n_prior: int | None = None, seed: int = 0) -> None:
        if not 0.0 <= interpolation <= 1.0:
            raise CryowaeInputError(f"--interpolation must lie in [0, 1], got {interpolation:g}")
        if not epsilon > 0:
            raise CryowaeInputError(f"--epsilon must be positive, got {epsilon:g}")
        self.training_codes = training_codes
        self.sigma, self.epsilon, self.t = float(sigma), float(epsilon), float(interpolation)
        self.prior, self.n_prior, self.seed = prior, n_prior, int(seed)
        self.tile_codes: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self.cond: torch.Tensor | None = None
        self.plan: EntropicPlan | None = None

    def setup(self, tile_codes: torch.Tensor) -> dict[str, Any]:
        z = tile_codes.detach().float().cpu()
        n, d = z.shape
        gen = torch.Generator().manual_seed(self.seed)
        ps = build_prior_sample(d, n, self.training_codes, self.sigma, self.prior,
                                self.n_prior, generator=gen)
        source = torch.cat([z, ps.context]) if ps.context.shape[0] else z
        eps = absolute_eps(self.epsilon, d, ps.scale)
        plan = entropic_plan(source, ps.target, eps)
        cond = plan.conditionals()[:n]  # rows of the tiles (context rows dropped)
        self.tile_codes, self.target, self.cond, self.plan = z, ps.target, cond, plan
        eff = effective_codes(cond)
        bary = barycentric_map(cond, ps.target)
        return {
            "prior": ps.kind, "prior_scale": ps.scale, "n_prior": int(ps.target.shape[0]),
            "n_context": int(ps.context.shape[0]), "eps_absolute": plan.eps,
            "blur": plan.blur, "plan_row_error": plan.row_error,
            "plan_col_error": plan.col_error, "plan_extra_iterations": plan.iterations,
            "interpolation": self.t,
            "effective_codes_per_tile": {"mean": float(eff.mean()), "min": float(eff.min()),
                                         "max": float(eff.max())},
            "barycentric_shift_rms": float((bary - z).norm(dim=1).mean()),
            "tile_code_rms": float(z.norm(dim=1).mean()),
            "notes": ps.notes,
        }

    def codes(self, sample: int) -> torch.Tensor:
        assert self.cond is not None and self.target is not None and self.tile_codes is not None
        gen = torch.Generator().manual_seed(self.seed * 100003 + 7919 * (sample + 1))
        j = torch.multinomial(self.cond, 1, generator=gen)[:, 0]
        y = self.target[j]
        if self.t == 1.0:
            return y.clone()
        return self.tile_codes + self.t * (y - self.tile_codes)


class GaussianCodeSampler(CodeSampler):
    """z_i + noise: N(0, (epsilon * sigma)^2 I) for a deterministic encoder (sigma the
    prior's), or the encoder's own predicted std for a Gaussian encoder (`enc_std`)."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0, epsilon: float = 0.5, seed: int = 0) -> None:
        if not epsilon > 0:
            raise CryowaeInputError(f"--epsilon must be positive, got {epsilon:g}")
        self.sigma, self.epsilon, self.seed = float(sigma), float(epsilon), int(seed)
        self.tile_codes: torch.Tensor | None = None
        self.enc_std: torch.Tensor | None = None

    def setup(self, tile_codes: torch.Tensor, enc_std: torch.Tensor | None = None
              ) -> dict[str, Any]:
        self.tile_codes = tile_codes.detach().float().cpu()
        self.enc_std = None if enc_std is None else enc_std.detach().float().cpu()
        if self.enc_std is not None:
            return {"noise": "gaussian encoder's own std",
                    "noise_std_mean": float(self.enc_std.mean())}
        return {"noise": "epsilon * prior sigma", "noise_std": self.epsilon * self.sigma}

    def codes(self, sample: int) -> torch.Tensor:
        assert self.tile_codes is not None
        gen = torch.Generator().manual_seed(self.seed * 100003 + 7919 * (sample + 1))
        noise = torch.randn(self.tile_codes.shape, generator=gen)
        std = self.enc_std if self.enc_std is not None else self.epsilon * self.sigma
        return self.tile_codes + noise * std


# ------------------------------------------------------------ proper cube rotations
def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations of the cube as signed permutation matrices acting on
    (z, y, x), identity first. Exact on cubic tiles (no interpolation)."""
    import itertools

    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            r = np.zeros((3, 3), dtype=np.int64)
            for i, (p, s) in enumerate(zip(perm, signs, strict=True)):
                r[i, p] = s
            if round(np.linalg.det(r)) == 1:
                mats.append(r)
    mats.sort(key=lambda r: (not np.array_equal(r, np.eye(3, dtype=np.int64)),))
    return mats


def rotate_cube(x: torch.Tensor, r: np.ndarray, inverse: bool = False) -> torch.Tensor:
    """Apply the signed permutation `r` to the last three axes of `x`:
    out(p) = x(R^T p) (or its inverse), exactly."""
    r = r.T if inverse else r
    lead = x.ndim - 3
    # out[p] = x[R^T p]: output axis i reads input axis perm[i] (with its sign)
    perm = [int(np.nonzero(r[i])[0][0]) for i in range(3)]
    signs = [int(r[i, perm[i]]) for i in range(3)]
    y = x.permute(*range(lead), *[lead + p for p in perm])
    flip = [lead + i for i in range(3) if signs[i] < 0]
    return y.flip(flip) if flip else y
