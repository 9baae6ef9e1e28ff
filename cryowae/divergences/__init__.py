"""Latent divergences between the aggregated posterior (all codes) and the prior.

Codes are (N, d) float tensors. Start from `build_divergence(name, dim, prior)`, wrap it
in a `CodeBank` to estimate the aggregate from more codes than one minibatch, and run
`prefers_prior` at start-up to make sure the penalty at that size ranks wrong clouds
above fresh prior samples.
"""

from cryowae.divergences.adversarial import AdversarialDivergence, LatentDiscriminator
from cryowae.divergences.bank import CodeBank, aggregate_with_bank
from cryowae.divergences.check import PrefersPriorResult, prefers_prior
from cryowae.divergences.mmd import (
    IMQ_SCALES,
    KERNELS,
    RBF_SCALES,
    kernel_constants,
    mmd,
    mmd_blockwise,
    mmd_dense,
)
from cryowae.divergences.priors import GaussianPrior, Prior, ReferencePrior
from cryowae.divergences.registry import (
    DIVERGENCES,
    AdversarialLatent,
    LatentDivergence,
    MMDLatent,
    NoDivergence,
    SinkhornLatent,
    SlicedLatent,
    build_divergence,
    divergence_options,
)
from cryowae.divergences.sinkhorn import SinkhornDivergence, sinkhorn_divergence
from cryowae.divergences.sliced import (
    SlicedWasserstein,
    random_directions,
    sliced_wasserstein,
    wasserstein_1d_squared,
)

__all__ = [
    "DIVERGENCES",
    "IMQ_SCALES",
    "KERNELS",
    "RBF_SCALES",
    "AdversarialDivergence",
    "AdversarialLatent",
    "CodeBank",
    "aggregate_with_bank",
    "GaussianPrior",
    "LatentDiscriminator",
    "LatentDivergence",
    "MMDLatent",
    "NoDivergence",
    "PrefersPriorResult",
    "Prior",
    "ReferencePrior",
    "SinkhornDivergence",
    "SinkhornLatent",
    "SlicedLatent",
    "SlicedWasserstein",
    "build_divergence",
    "divergence_options",
    "kernel_constants",
    "mmd",
    "mmd_blockwise",
    "mmd_dense",
    "prefers_prior",
    "random_directions",
    "sinkhorn_divergence",
    "sliced_wasserstein",
    "wasserstein_1d_squared",
]
