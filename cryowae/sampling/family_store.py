"""The working files of `cryowae.sampling.files.sample_file` in its partial folder: the
family's centre (``centre.npy``), mean.mrc and std.mrc of the float32 store, and the
copy of the kept samples into samples.zarr.

The centre is the mean path's restoration of the tomogram, as ``cryowae restore``
gives it. With the ``prior`` sampler it streams out of the sampling pass itself
(`centre_from_pass`: the first group's tiles already run the mean path), when that pass
tiles the tomogram as the restoration does and computes in the same precision, so the
centre is bit for bit what `restore_array` would give; otherwise it is restored on its
own (`restored_centre`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cryowae.io.volume import Volume
from cryowae.physics.geometry import TiltGeometry
from cryowae.precision import amp_active
from cryowae.progress import ProgressReporter
from cryowae.sampling.family import CentreSink, FamilyPlan, family_figures, family_moments
from cryowae.sampling.family_state import FamilyRun
from cryowae.tiling.engine import array_sink
from cryowae.tiling.pages import page_releasing, release_pages
from cryowae.tiling.settings import TileSettings

#: float64 bytes of one block of `family_moments` over all samples (at least one chunk
#: row), and float32 bytes of one slab copied into samples.zarr
MOMENT_BYTES = 4 << 20
#: MRC modes of std.mrc's dtypes
MRC_MODES = {"float32": 2, "float16": 12}
CENTRE = "centre.npy"


class SampleView:
    """Write access to sample s of an (S, Z, Y, X) zarr array, for `array_sink`."""

    def __init__(self, arr: Any, s: int) -> None:
        self.arr, self.s = arr, int(s)
        self.shape = tuple(arr.shape[1:])

    def __setitem__(self, key: Any, value: np.ndarray) -> None:
        self.arr[(self.s, *key)] = value


def pass_gives_centre(fp: FamilyPlan, restorer: Any, settings: TileSettings,
                      amp: bool | None) -> bool:
    """Whether the sampling pass of `fp` restores the tiles as `restore_array` with
    `settings` and the default precision would: the ``prior`` sampler, the same tile
    plan and batch size, and bf16 autocast on or off alike."""
    multiple = int(getattr(restorer.model, "multiple", 1) or 1)
    return (fp.sampler == "prior" and fp.batch_size == settings.batch_size
            and fp.plan == settings.plan(fp.plan.shape, multiple)
            and amp_active(fp.device, amp) == amp_active(fp.device, None))


def centre_from_pass(partial: Path, shape: tuple[int, ...], run: FamilyRun) -> CentreSink:
    """A `CentreSink` writing the centre into ``partial/centre.npy``; once complete it is
    flushed and ``centre_ready`` recorded in the run's calibration state."""
    path = partial / CENTRE
    out = np.lib.format.open_memmap(path, "w+", np.float32, tuple(shape))
    sink = array_sink(out)

    def done() -> None:
        release_pages(out, flush=True)
        run.calibration["centre_ready"] = True
        run.save()

    return CentreSink(sink, done)


def restored_centre(restorer: Any, data: Any, norm: tuple[float, float],
                    settings: TileSettings, partial: Path, run: FamilyRun,
                    prog: ProgressReporter) -> Any:
    """The centre memory-mapped from ``partial/centre.npy``: the one the sampling pass
    wrote, or (not yet complete) the mean path's restoration by `restore_array`,
    recorded so that a resumed run reuses it."""
    from cryowae.inference.restore import restore_array

    path, state = partial / CENTRE, run.calibration
    if not (state.get("centre_ready") and path.is_file()):
        prog.log("family centre: the mean path's restoration")
        out = np.lib.format.open_memmap(path, "w+", np.float32, tuple(data.shape))
        restore_array(restorer, data, settings.tile, settings.overlap, settings.batch_size,
                      out=out, norm=norm)
        release_pages(out, flush=True)
        del out
        state["centre_ready"] = True
        run.save()
    return page_releasing(np.load(path, mmap_mode="r"))


def moment_block(samples: Any) -> tuple[int, int, int]:
    """Blocks of `family_moments`: whole chunks of the store, about `MOMENT_BYTES` of
    float64 over all samples."""
    n = int(samples.shape[0])
    cz, cy, cx = (int(c) for c in samples.chunks[1:])
    per_chunk_slice = n * cy * cx * 8
    return (cz * max(1, MOMENT_BYTES // max(1, per_chunk_slice * cz)), cy, cx)


def write_moments(partial: Path, work: Any, vol: Volume, geometry: TiltGeometry,
                  norm: tuple[float, float], consistency: str, halves: list[Any],
                  std_dtype: str) -> dict[str, Any]:
    """mean.mrc (float32) and std.mrc (`std_dtype`) of all N float32 samples in
    `work`, and the figures of ``family.json`` (`family_figures`)."""
    from cryowae.io import open_mrc_writer

    for name in ("mean.mrc", "std.mrc"):
        (partial / name).unlink(missing_ok=True)
    shape = tuple(int(v) for v in work.shape[1:])
    with open_mrc_writer(partial / "mean.mrc", shape, vol.voxel_size, origin=vol.origin,
                         overwrite=True) as m_out, \
            open_mrc_writer(partial / "std.mrc", shape, vol.voxel_size, origin=vol.origin,
                            overwrite=True, mode=MRC_MODES[std_dtype]) as s_out:
        family_moments(work, m_out, s_out, moment_block(work))
        release_pages(m_out, flush=True)
        release_pages(s_out, flush=True)
        return family_figures(work, (m_out, s_out), vol.data, geometry, norm, consistency,
                              *halves)


def export_samples(work: Any, folder: Path, level0: Any, keep: int, run: FamilyRun) -> None:
    """Samples 0..keep-1 of the float32 working store (at `folder`) into samples.zarr,
    whole chunk rows along Z at a time; each sample's working chunks are removed once
    it is copied (and recorded in `run`), those of the others at once, so the disk
    holds the working store or samples.zarr, not both."""
    cz = int(level0.chunks[1])
    shape = tuple(int(v) for v in work.shape[1:])
    step = cz * max(1, MOMENT_BYTES // max(1, 4 * cz * shape[1] * shape[2]))
    exported = run.output.setdefault("exported", [])
    for i in range(int(work.shape[0])):
        if i < keep and i not in exported:
            for z in range(0, shape[0], step):
                level0[i, z:z + step] = np.asarray(work[i, z:z + step], np.float32)
            exported.append(i)
            run.save()
        # zarr format 2 keys: "s.z.y.x" under the store's folder
        for chunk in folder.glob(f"{i}.*"):
            chunk.unlink()


__all__ = ["CENTRE", "MOMENT_BYTES", "MRC_MODES", "SampleView", "centre_from_pass",
           "export_samples", "moment_block", "pass_gives_centre", "restored_centre",
           "write_moments"]
