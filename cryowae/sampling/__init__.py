"""Posterior families: many restorations of one tomogram that agree with what was
measured (within its noise) and differ where the missing wedge hides information.

`sample_array` (in memory) and `sample_file` (streamed to an output directory,
resumable) are the entry points; both run the tile engine through `family.run_family`.
`samplers` holds where the samples come from (prior latent fields of a stochastic
restorer by default; test-time rotations and ensembles for deterministic models),
`consistency` the data-consistency check (residual against the data over the noise,
per shell).
"""

from cryowae.sampling.consistency import CONSISTENCY, consistency_check, region_spread
from cryowae.sampling.family import (
    FamilyPlan,
    FamilyResult,
    family_moments,
    plan_family,
    run_family,
    sample_array,
)
from cryowae.sampling.files import sample_file
from cryowae.sampling.samplers import (
    DEFAULT_SAMPLER,
    SAMPLERS,
    aligned_plan,
    cube_rotations,
    rotate_cube,
    sample_generator,
)

__all__ = [
    "CONSISTENCY", "DEFAULT_SAMPLER", "SAMPLERS", "FamilyPlan", "FamilyResult",
    "aligned_plan", "consistency_check", "cube_rotations", "family_moments",
    "plan_family", "region_spread", "rotate_cube", "run_family", "sample_array",
    "sample_file", "sample_generator",
]
