"""Posterior families (CryoWGEN): many restorations of one tomogram that agree with what
was measured and differ where the missing wedge hides information.

`sample_array` (in memory) and `sample_file` (streamed to an output directory) are the
entry points; `ot_sampler` chooses the codes, `consistency` keeps the measured data.
"""

from cryowae.sampling.consistency import (
    Consistency,
    fourier_region_energy,
    impose_consistency_blockwise,
    measured_fsc,
    noise_std_from_halves,
    prepare_consistency,
)
from cryowae.sampling.family import (
    SAMPLERS,
    FamilyResult,
    FamilyStream,
    SamplingCancelled,
    sample_array,
    sample_file,
    stream_family,
)
from cryowae.sampling.ot_sampler import (
    EntropicPlan,
    GaussianCodeSampler,
    OTCodeSampler,
    barycentric_map,
    build_prior_sample,
    effective_codes,
    entropic_plan,
)

__all__ = [
    "SAMPLERS", "Consistency", "EntropicPlan", "FamilyResult", "FamilyStream",
    "GaussianCodeSampler", "OTCodeSampler", "SamplingCancelled", "barycentric_map",
    "build_prior_sample", "effective_codes", "entropic_plan", "fourier_region_energy",
    "impose_consistency_blockwise", "measured_fsc", "noise_std_from_halves",
    "prepare_consistency", "sample_array", "sample_file", "stream_family",
]
