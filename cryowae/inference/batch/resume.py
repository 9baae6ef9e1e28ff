"""Planning a `restore-batch` run: what each tomogram needs, what an earlier run left.

A tomogram's run is identified by a *fingerprint* (format, input file identity, model
file identity, resolved tile, overlap, window, block, chunk, levels, shape) stored with
the normalisation in the output store's attributes. A ``NAME.zarr.partial`` store with
the same fingerprint is resumed: blocks with a marker in its ``.cryowae_done/`` folder
count as done. Another fingerprint starts that tomogram over; a finished ``NAME.zarr``
with the same fingerprint is kept, one with another is refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryowae.data.inputs import input_stem, output_names
from cryowae.errors import CryowaeInputError
from cryowae.inference.batch.settings import (
    ATTR,
    DONE_DIR,
    FORMAT,
    PARTIAL_SUFFIX,
    BatchSettings,
    Core,
    block_grid,
    block_id,
)
from cryowae.models.cache import model_file
from cryowae.progress import ProgressReporter, ensure_progress


@dataclass
class TomogramJob:
    """One tomogram of a batch, as planned on the client."""

    index: int
    input: Path
    name: str
    final: Path
    partial: Path
    mrc: Path | None
    shape: tuple[int, int, int]
    voxel_size: float
    origin: tuple[float, float, float]
    mrc_meta: dict[str, Any]
    fingerprint: dict[str, Any]
    cores: list[Core]
    done: set[str] = field(default_factory=set)
    norm: tuple[float, float] | None = None
    #: "restore" (blocks to run), "finish" (all blocks done, store not finalised),
    #: "mrc" (zarr finished, MRC missing), "done" (nothing to do)
    state: str = "restore"

    @property
    def n_blocks(self) -> int:
        return len(self.cores)

    def attrs(self) -> dict[str, Any]:
        """The store attributes that let a later run recognise this one."""
        return {ATTR: {"settings": self.fingerprint, "norm": list(self.norm or ()),
                       "source": str(self.input)}}


def output_name(path: str | os.PathLike) -> str:
    """Output name of an input alone: its file name without ``.mrc``/``.zarr``/
    ``.ome.zarr``... suffixes (`cryowae.data.inputs.input_stem`); in a batch, the names
    come from `cryowae.data.inputs.output_names` over all inputs."""
    return input_stem(path)


def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": int(st.st_size),
            "mtime_ns": int(st.st_mtime_ns)}


def _input_id(path: Path) -> dict[str, Any]:
    if path.is_dir():  # a zarr store: its level-0 metadata and the group's
        meta = [m for m in (path / "0" / ".zarray", path / "0" / "zarr.json",
                            path / ".zattrs", path / "zarr.json") if m.exists()]
        ids = [_file_id(m) for m in meta]
        return {"path": str(path.resolve()), "size": sum(i["size"] for i in ids),
                "mtime_ns": max((i["mtime_ns"] for i in ids), default=0)}
    return _file_id(path)


def _read_attrs(store: Path) -> dict[str, Any]:
    try:
        import zarr

        return dict(zarr.open_group(str(store), mode="r").attrs)
    except Exception:  # not a zarr group, or a broken one
        return {}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def _markers(partial: Path, names: set[str]) -> set[str]:
    d = partial / DONE_DIR
    if not d.is_dir():
        return set()
    return {n for n in os.listdir(d) if n in names}


def _new_job(index: int, p: Path, name: str, out: Path, settings: BatchSettings,
             tile: int, model_id: dict[str, Any]) -> TomogramJob:
    """A job for input `p` written to ``out/<name>.zarr``, from its header (the file is
    closed again)."""
    from cryowae.io import read_volume

    with read_volume(p) as vol:
        shape, voxel_size, origin = vol.shape, float(vol.voxel_size), tuple(vol.origin)
        mrc_meta = {k: vol.meta[k] for k in ("mrc_labels", "mrc_nstart") if k in vol.meta}
    if min(shape) < 1:
        raise CryowaeInputError(f"{p}: empty volume {shape}")
    fp = {"format": FORMAT, "input": _input_id(p), "model": model_id, "tile": tile,
          "overlap": settings.tiles.overlap, "window": settings.tiles.window,
          "block": settings.block, "chunk": settings.out_chunk,
          "levels": settings.levels, "shape": list(shape)}
    return TomogramJob(
        index=index, input=p, name=name, final=out / f"{name}.zarr",
        partial=out / f"{name}.zarr{PARTIAL_SUFFIX}",
        mrc=out / f"{name}.mrc" if settings.mrc else None, shape=shape,
        voxel_size=voxel_size, origin=origin,  # type: ignore[arg-type]
        mrc_meta=mrc_meta, fingerprint=fp, cores=block_grid(shape, settings.block))


def _resume_state(job: TomogramJob, settings: BatchSettings,
                  progress: ProgressReporter) -> None:
    """Set `job.done`, `job.norm` and `job.state` from what is on disk."""
    ids = {block_id(c, settings.block) for c in job.cores}
    fp = job.fingerprint
    if job.final.exists() and not settings.overwrite:
        attrs = _read_attrs(job.final)
        rec = attrs.get(ATTR, {})
        if "multiscales" in attrs and _same(rec.get("settings", {}), fp):
            job.done, job.norm = ids, tuple(rec["norm"])
            job.state = "mrc" if job.mrc is not None and not job.mrc.exists() else "done"
            return
        raise CryowaeInputError(f"output {job.final} exists (made from other inputs or "
                                "settings); pass --overwrite to replace it")
    if job.mrc is not None and job.mrc.exists() and not settings.overwrite:
        raise CryowaeInputError(f"output {job.mrc} exists; pass --overwrite to replace it")
    if job.partial.exists():
        attrs = _read_attrs(job.partial)
        rec = attrs.get(ATTR, {})
        if rec and _same(rec.get("settings", {}), fp) and rec.get("norm"):
            job.norm = tuple(rec["norm"])
            if "multiscales" in attrs:
                job.done, job.state = ids, "finish"
            else:
                job.done = _markers(job.partial, ids)
                job.state = "finish" if len(job.done) == len(ids) else "restore"
        else:
            progress.log(f"{job.name}: the interrupted run used other inputs or settings; "
                         "starting this tomogram over")
            shutil.rmtree(job.partial)


def plan_batch(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
               settings: BatchSettings, multiple: int,
               progress: ProgressReporter | None = None) -> list[TomogramJob]:
    """Read every input's header, and find out what is left to do for each.

    Outputs are named by `cryowae.data.inputs.output_names` (file stems when unique,
    else paths relative to the inputs' common folder: ``out/TS_01/tomo.zarr``).
    Raises `CryowaeInputError` (before any work starts) for an unreadable input, two
    inputs with one output name, or a finished output that `settings` may not replace.
    """
    progress = ensure_progress(progress)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CryowaeInputError(f"--out {out}: exists and is not a directory")
    model_id = _file_id(model_file(settings.model))
    tile = settings.tiles.resolved_tile(multiple)
    jobs: list[TomogramJob] = []
    names: dict[str, Path] = {}
    for i, (inp, name) in enumerate(zip(inputs, output_names(inputs), strict=True)):
        p = Path(inp)
        job = _new_job(i, p, name, out, settings, tile, model_id)
        if job.name in names:
            raise CryowaeInputError(f"{p} and {names[job.name]} would both be written to "
                                    f"{job.final}; rename one")
        names[job.name] = p
        _resume_state(job, settings, progress)
        jobs.append(job)
    return jobs


def create_partial(job: TomogramJob, settings: BatchSettings) -> None:
    """Create the job's ``.partial`` store (level 0 and the pyramid's arrays, no NGFF
    metadata yet) and its marker folder."""
    from cryowae.io.omezarr import OmeZarrWriter

    job.partial.parent.mkdir(parents=True, exist_ok=True)
    OmeZarrWriter(job.partial, job.shape, job.voxel_size, settings.levels,
                  (settings.out_chunk,) * 3, (), job.origin, job.attrs())
    (job.partial / DONE_DIR).mkdir(exist_ok=True)


__all__ = ["TomogramJob", "create_partial", "output_name", "plan_batch"]
