"""The crowded-cell tomogram simulator (`cryowae simulate`), apart from the forward model
in `cryowae.physics`.

Modules: `config` (`SimulationConfig`), `shapes` (densities of bilayers, filaments,
soft edges), `species` (procedural and atomic macromolecules), `potential` (atomic
models to Coulomb potential), `phantom` (`make_scene`: placement in a slab),
`projection` (exact projector about Y and weighted back-projection), `tilt_series`
(imaging: CTF, attenuation, counting noise; reconstruction of the even/odd halves),
`pipelines` (named acquisition + reconstruction pipelines, `--pipeline NAME`),
`reconstruct` (their filters: WBP apodizations, Fourier insertion, exposure filter,
binning) and `simulate` (`simulate_tomogram`, `write_simulation`). Example structures for ``--pdb``
are downloaded by `cryowae.data.structures`.
"""

from cryowae.simulation.config import SimulationConfig, default_thickness
from cryowae.simulation.simulate import (
    OUTPUT_FILES,
    check_output_dir,
    simulate_tomogram,
    write_simulation,
)

__all__ = ["OUTPUT_FILES", "SimulationConfig", "check_output_dir", "default_thickness",
           "simulate_tomogram", "write_simulation"]
