"""Name -> latent divergence, with one calling convention for the trainer.

Every divergence is a `LatentDivergence` (an ``nn.Module``) called as
``div(z_q, z_p) -> scalar tensor`` with ``z_q`` the encoder's codes (n, d) (with grad)
and ``z_p`` a prior sample (m, d). ``div.discriminator_step(z_q, z_p)`` exists on all of
them and does something only for ``"adversarial"`` (it returns the discriminator's loss;
``None`` elsewhere), so the trainer can call it unconditionally once per step.

Values are dimensionless: MMD's kernel constants scale with the prior's sigma, and the
transport-based divergences (Sinkhorn, sliced) are divided by sigma^p (sigma^2 for sliced) when
``normalize=True`` (default), so one penalty weight lambda fits priors of any scale.

=============  ==============================================================  ==========
name           options (keyword, default)                                      memory
=============  ==============================================================  ==========
mmd            kernel="imq" | "rbf", scales=None, block_size=1024,             O(N d)
               implementation="blockwise" | "dense"
sinkhorn       blur=4.0 (x sigma), scaling=0.9, backend="tensorized",          O(N^2)
               normalize=True, p=1 (cost |x-y|^p)
sliced         n_projections=128, generator=None, seed=0, normalize=True       O(N L)
adversarial    hidden=512, layers=4, lr=5e-4, seed=0  (unstable baseline)      O(N)
none           (no options) returns 0 with a graph to z_q                      -
=============  ==============================================================  ==========
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from cryowae.divergences.adversarial import AdversarialDivergence
from cryowae.divergences.mmd import kernel_constants, mmd_blockwise, mmd_dense
from cryowae.divergences.priors import GaussianPrior, Prior
from cryowae.divergences.sinkhorn import SinkhornDivergence
from cryowae.divergences.sliced import SlicedWasserstein
from cryowae.errors import CryowaeInputError

DIVERGENCES = ("mmd", "sinkhorn", "sliced", "adversarial", "none")


class LatentDivergence(nn.Module):
    """Base class: ``__call__(z_q (n, d), z_p (m, d)) -> scalar tensor``.

    Attributes:
        name: registry name.
        dim: code dimension d.
        scale: the prior's sigma the divergence was built for.
        bank_value_scaling: whether the trainer multiplies the value-based weight of this
            penalty by N/B for an aggregate of N codes of which B carry gradients (see
            `cryowae.training.loss.TermBalancer`); a config can override it.
    """

    name = "base"
    bank_value_scaling = True

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.dim = int(dim)
        self.scale = float(scale)

    def _check(self, z_q: torch.Tensor, z_p: torch.Tensor) -> None:
        if z_q.ndim != 2 or z_q.shape[1] != self.dim or z_p.ndim != 2 or z_p.shape[1] != self.dim:
            raise CryowaeInputError(
                f"{self.name} divergence built for dimension {self.dim} got codes of shape "
                f"{tuple(z_q.shape)} and prior samples of shape {tuple(z_p.shape)}"
            )

    def discriminator_step(self, z_q: torch.Tensor, z_p: torch.Tensor) -> float | None:
        """Update an internal critic, if any (only ``adversarial``); else no-op, None."""
        return None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, scale={self.scale:g}"


class MMDLatent(LatentDivergence):
    """Multi-scale IMQ (or RBF) kernel MMD^2; see `cryowae.divergences.mmd`."""

    name = "mmd"
    # Measured (docs/benchmarks.md, "IMQ-MMD over 10 minutes: the N/B weight"): with the value-based
    # weight scaled by N/B (about 70 once the bank is full) the IMQ-MMD codes oscillated
    # between the prior and a collapsed, drifting cloud over 10-minute runs (seed 2: std
    # 0.08, |mean| 12.4, MMD 5.7 against 4.7 for no penalty); without it the same runs
    # ended at MMD 1.0 (seed 2) and 1.6 (seed 0). Sliced and adversarial keep N/B.
    bank_value_scaling = False

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        kernel: str = "imq",
        scales: Sequence[float] | None = None,
        block_size: int = 1024,
        implementation: str = "blockwise",
    ) -> None:
        super().__init__(dim, scale)
        if implementation not in ("blockwise", "dense"):
            raise CryowaeInputError(
                f"unknown MMD implementation {implementation!r}: use blockwise or dense"
            )
        self.kernel = str(kernel).lower()
        self.scales = None if scales is None else tuple(float(s) for s in scales)
        self.block_size = int(block_size)
        self.implementation = implementation
        # validate kernel name / scales now rather than at the first step
        kernel_constants(self.dim, self.scale, self.kernel, self.scales)

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        self._check(z_q, z_p)
        if self.implementation == "dense":
            return mmd_dense(z_q, z_p, scale=self.scale, kernel=self.kernel, scales=self.scales)
        return mmd_blockwise(
            z_q,
            z_p,
            scale=self.scale,
            kernel=self.kernel,
            scales=self.scales,
            block_size=self.block_size,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel={self.kernel}, scales={self.scales}, "
            f"block_size={self.block_size}, implementation={self.implementation}"
        )


class SinkhornLatent(LatentDivergence):
    """Debiased Sinkhorn divergence (GeomLoss, tensorized); see `.sinkhorn`."""

    name = "sinkhorn"
    # Measured: with N/B on the value weight (about 58 once the bank is full) a 15-minute
    # run on seed 1 collapsed the codes (std 0.004, MMD to prior 2.46); without it the
    # same run kept them (std 0.53, MMD 0.53) and restored better (docs/benchmarks.md).
    bank_value_scaling = False

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        blur: float = 4.0,
        scaling: float = 0.9,
        backend: str = "tensorized",
        normalize: bool = True,
        p: int = 1,
    ) -> None:
        super().__init__(dim, scale)
        self.sinkhorn = SinkhornDivergence(scale, blur, scaling, backend, p)
        self.normalize = bool(normalize)

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        self._check(z_q, z_p)
        value = self.sinkhorn(z_q, z_p)
        return value / self.scale**self.sinkhorn.p if self.normalize else value

    def extra_repr(self) -> str:
        s = self.sinkhorn
        return (
            f"{super().extra_repr()}, p={s.p}, blur={s.blur_rel:g} sigma, "
            f"scaling={s.scaling:g}, "
            f"backend={s.backend}, normalize={self.normalize}"
        )


class SlicedLatent(LatentDivergence):
    """Sliced W_2^2 with fresh random directions each call; see `.sliced`."""

    name = "sliced"

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        n_projections: int = 128,
        generator: torch.Generator | None = None,
        seed: int = 0,
        normalize: bool = True,
    ) -> None:
        super().__init__(dim, scale)
        self.sliced = SlicedWasserstein(n_projections, generator, seed)
        self.normalize = bool(normalize)

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        self._check(z_q, z_p)
        value = self.sliced(z_q, z_p)
        return value / self.scale**2 if self.normalize else value

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, n_projections={self.sliced.n_projections}, "
            f"normalize={self.normalize}"
        )


class AdversarialLatent(LatentDivergence):
    """WAE-GAN latent discriminator -- the UNSTABLE BASELINE; see `.adversarial`.

    ``__call__`` returns the encoder's non-saturating penalty (z_p unused);
    ``discriminator_step(z_q, z_p)`` trains the discriminator with its own optimiser.
    """

    name = "adversarial"

    def __init__(
        self,
        dim: int,
        scale: float = 1.0,
        hidden: int = 512,
        layers: int = 4,
        lr: float = 5e-4,
        seed: int | None = 0,
    ) -> None:
        super().__init__(dim, scale)
        self.adversary = AdversarialDivergence(dim, scale, hidden, layers, lr, seed)

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        self._check(z_q, z_p)
        return self.adversary.encoder_penalty(z_q)

    def discriminator_step(self, z_q: torch.Tensor, z_p: torch.Tensor) -> float | None:
        self._check(z_q, z_p)
        return self.adversary.discriminator_step(z_q, z_p)


class NoDivergence(LatentDivergence):
    """No latent matching: returns ``0 * z_q.sum()`` (a zero that backpropagates)."""

    name = "none"

    def forward(self, z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
        self._check(z_q, z_p)
        return z_q.sum() * 0.0


_CLASSES: dict[str, type[LatentDivergence]] = {
    "mmd": MMDLatent,
    "sinkhorn": SinkhornLatent,
    "sliced": SlicedLatent,
    "adversarial": AdversarialLatent,
    "none": NoDivergence,
}


def divergence_options(name: str) -> tuple[str, ...]:
    """The keyword options `build_divergence` accepts for ``name``."""
    cls = _lookup(name)
    params = list(inspect.signature(cls.__init__).parameters)
    return tuple(p for p in params if p not in ("self", "dim", "scale"))


def _lookup(name: str) -> type[LatentDivergence]:
    key = str(name).lower()
    if key not in _CLASSES:
        raise CryowaeInputError(
            f"unknown latent divergence {name!r}: use one of {', '.join(DIVERGENCES)}"
        )
    return _CLASSES[key]


def build_divergence(
    name: str, dim: int, prior: Prior | None = None, **options: object
) -> LatentDivergence:
    """Build the divergence ``name`` for codes of dimension ``dim``.

    Args:
        name: one of `DIVERGENCES`.
        dim: code dimension d.
        prior: the prior the codes are pulled to (its ``.scale`` sets the kernel
            constants / blur / normalisation); default ``GaussianPrior(dim, 1.0)``.
        **options: per-divergence options (see the module docstring).

    Raises:
        CryowaeInputError: unknown name, unknown option, or a prior of another dimension.
    """
    cls = _lookup(name)
    if prior is None:
        prior = GaussianPrior(dim)
    if getattr(prior, "dim", dim) != dim:
        raise CryowaeInputError(
            f"prior dimension {prior.dim} differs from the latent dimension {dim}"
        )
    allowed = divergence_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise CryowaeInputError(
            f"unknown option(s) {', '.join(unknown)} for the {name} divergence: "
            f"valid options are {', '.join(allowed) if allowed else '(none)'}"
        )
    return cls(dim, prior.scale, **options)  # type: ignore[arg-type]
