"""Restore many tomograms on a Dask cluster, block by block, resumably.

The unit of work is a *block*: a chunk-aligned core of ``block`` voxels per axis of one
tomogram's output (the last block of an axis may be shorter; `settings.block_grid`). A
block task (`tasks.restore_block`) runs the tile engine (`cryowae.tiling.run_tiles`)
with ``core=`` on the memory-mapped (or lazy zarr) input, reading only the slabs its
tiles need, and writes only its core into level 0 of the output OME-Zarr; the core is a
whole number of zarr chunks, so no two tasks ever touch one chunk.

Blocks agree with a single-pass `restore_array` of the whole tomogram (to float
rounding on CPU, where batches of other tiles may round differently; on CUDA, to the
bfloat16 noise of its autocast), for two reasons:

* normalisation uses the tomogram's global (mean, std), computed once per tomogram
  (`tasks.tomogram_norm`) and passed to every block;
* a block uses the *whole tomogram's* tile plan, not a plan of its own: every tile of
  that plan that overlaps the core is restored and blended with the same window and
  the same (separable) weight sums as in the single pass. Re-tiling the block would not
  do: the single pass spreads its tiles evenly over the whole axis, and the restorer's
  output for a voxel depends on the whole tile around it (GroupNorm statistics and the
  latent code pool over the tile), so a different grid changes every voxel. The halo
  of a block is therefore exactly the tiles that overlap its core: up to one tile
  (minus a voxel) beyond the core on each side. Tiles that overlap two blocks are
  restored by both, so the work is ``block_overhead(...)`` times a single pass (with
  --tile 96 --overlap 32: about 2-2.5x for --block 256 and 1.3x for --block 512 on
  300x1000x1000 to 500x2000x2000 tomograms): a larger block costs less.

Output of a tomogram ``NAME`` in ``DIR``: ``NAME`` is the input's file name without
suffix, or, when two inputs share a file name (``TS_01/tomo.mrc``, ``TS_02/tomo.mrc``),
every input's path relative to the inputs' common folder (``TS_01/tomo``), so outputs
keep the inputs' folders (`cryowae.data.inputs.output_names`):

* while blocks are running, ``DIR/NAME.zarr.partial``: a zarr group without NGFF
  metadata (`read_volume` refuses it), whose ``.cryowae_done/`` folder holds an empty
  marker file per finished block, written after the block's chunks;
* when every block is done, a finalising task builds the pyramid and the NGFF
  metadata, removes the markers and renames the store to ``DIR/NAME.zarr``; with
  ``mrc=True`` it then writes ``DIR/NAME.mrc`` (atomically).

A rerun after a crash, a killed worker or a cancelled SLURM job does only the blocks
without a marker (`resume.plan_batch`; the store remembers its settings and
normalisation; a rerun with other settings starts that tomogram over) and gives the
same output as an uninterrupted run. A finished ``NAME.zarr`` restored with the same
settings is kept (its blocks count as done); one made otherwise is refused unless
``overwrite``.

Modules: `settings` (BatchSettings, block geometry), `tasks` (worker tasks), `resume`
(planning and resumption), `driver` (`restore_batch`); clusters are in
`cryowae.inference.cluster`.
"""

from cryowae.inference.batch.driver import BatchResult, restore_batch
from cryowae.inference.batch.resume import TomogramJob, output_name, plan_batch
from cryowae.inference.batch.settings import (
    ATTR,
    DONE_DIR,
    FORMAT,
    PARTIAL_SUFFIX,
    BatchSettings,
    block_grid,
    block_id,
    block_overhead,
)
from cryowae.inference.batch.tasks import (
    BlockTask,
    FinalizeTask,
    finalize_tomogram,
    restore_block,
    tomogram_norm,
    write_mrc_from_zarr,
)

__all__ = [
    "ATTR", "DONE_DIR", "FORMAT", "PARTIAL_SUFFIX", "BatchResult", "BatchSettings",
    "BlockTask", "FinalizeTask", "TomogramJob", "block_grid", "block_id", "block_overhead",
    "finalize_tomogram", "output_name", "plan_batch", "restore_batch", "restore_block",
    "tomogram_norm", "write_mrc_from_zarr",
]
