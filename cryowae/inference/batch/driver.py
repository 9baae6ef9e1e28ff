"""The driver of `restore-batch`: plans the run, submits the tasks, follows them."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryowae.data.inputs import expand_inputs
from cryowae.errors import CryowaeInputError
from cryowae.inference.batch.resume import TomogramJob, create_partial, plan_batch
from cryowae.inference.batch.settings import BatchSettings, block_id, block_overhead
from cryowae.inference.batch.tasks import (
    BlockTask,
    FinalizeTask,
    finalize_tomogram,
    restore_block,
    tomogram_norm,
)
from cryowae.inference.restore import voxel_size_warning
from cryowae.progress import Cancelled, ProgressReporter, ensure_progress
from cryowae.tiling.settings import TileSettings


@dataclass
class BatchResult:
    """What `restore_batch` did."""

    outputs: list[Path]
    blocks_total: int
    blocks_run: int
    blocks_already_done: int
    skipped: list[Path]  # finished outputs kept as they were
    failed: dict[str, str]  # input -> one-line reason
    elapsed_s: float
    workers: int
    overhead: float  # tiles restored by the blocks / tiles of single passes

    def summary(self) -> str:
        n_ok = len(self.outputs)
        return (f"restored {n_ok} tomogram{'s' if n_ok != 1 else ''} "
                f"({len(self.skipped)} already finished); blocks: {self.blocks_total} total, "
                f"{self.blocks_run} restored in this run, {self.blocks_already_done} already "
                f"done; {self.elapsed_s:.1f} s on {self.workers} worker"
                f"{'s' if self.workers != 1 else ''}")


def _error_line(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__


def restore_batch(inputs: Sequence[str | os.PathLike], model: str | os.PathLike,
                  out_dir: str | os.PathLike, *, block: int = 256, chunk: int | None = None,
                  tile: int = 96, overlap: int = 32, batch_size: int = 4,
                  window: str = "cosine", levels: int = 3, mrc: bool = False,
                  overwrite: bool = False, client: Any = None, cluster: str = "local",
                  cluster_config: str | os.PathLike | None = None,
                  workers: int | None = None,
                  progress: ProgressReporter | None = None) -> BatchResult:
    """Restore tomograms `inputs` into ``out_dir/<name>.zarr`` on a Dask cluster.

    Parameters
    ----------
    inputs
        MRC files or OME-Zarr stores, read memory-mapped / lazily by the workers; globs,
        list files and CryoET Data Portal folders are expanded
        (`cryowae.data.inputs.expand_inputs`).
    model
        ``model.pt`` (or a run directory holding one), loaded once per worker.
    out_dir
        Output folder (created). See the module docstring for the layout; outputs are
        named by `cryowae.data.inputs.output_names` (``TS_01/tomo.zarr`` when two
        inputs share a file name).
    block
        Edge of a block's core (voxels), a multiple of the output `chunk` (default 64,
        or the block itself when 64 does not divide it).
    tile, overlap, batch_size, window
        As `restore_array`; the result equals its single pass up to float rounding.
    levels
        Pyramid levels of the OME-Zarr output.
    mrc
        Also write ``out_dir/<name>.mrc``.
    overwrite
        Replace finished outputs; otherwise one restored with the same settings is
        kept, one restored otherwise is refused.
    client
        A `distributed.Client` to use (left open). Default: start a cluster with
        `cryowae.inference.cluster.make_cluster(cluster, cluster_config, workers)` and
        close it at the end.
    progress
        Reporter over blocks (its total includes blocks already done) and messages;
        `progress.cancel()` stops the run (finished blocks stay recorded).

    Returns a `BatchResult`; failed tomograms are listed there (their finished blocks
    are kept for a rerun), the others are finished.
    """
    from distributed import Client, as_completed

    from cryowae.inference.cluster import BLOCK_RESOURCE, DevicePlugin, load_slurm_config
    from cryowae.models.checkpoint import load_restorer

    progress = ensure_progress(progress)
    t_start = time.perf_counter()
    if not inputs:
        raise CryowaeInputError("no input tomograms given")
    model, out_dir = os.path.abspath(model), os.path.abspath(out_dir)
    settings = BatchSettings(model=str(model), tiles=TileSettings(tile, overlap, batch_size,
                                                                  window),
                             block=int(block), chunk=chunk, levels=int(levels), mrc=bool(mrc),
                             overwrite=bool(overwrite))
    slurm_cfg = None
    if client is None and cluster == "slurm":
        slurm_cfg = load_slurm_config(cluster_config)
    elif client is None and cluster != "local":
        raise CryowaeInputError(f"--cluster {cluster!r}: choose local or slurm")
    if workers is not None and workers < 1:
        raise CryowaeInputError(f"--workers must be >= 1, got {workers}")
    expanded = expand_inputs(inputs, what="input tomogram")
    for note in expanded.notes:
        progress.log(note)
    # absolute paths: workers (SLURM jobs) may start in another directory
    inputs = [Path(os.path.abspath(p)) for p in expanded.paths]
    loaded = load_restorer(model, "cpu")  # validates the checkpoint on the client
    multiple = loaded.model.multiple
    jobs = plan_batch(inputs, out_dir, settings, multiple, progress)
    for job in jobs:
        warning = voxel_size_warning(job.voxel_size, loaded.voxel_size)
        if warning and job.state != "done":
            progress.log(f"{job.name}: {warning}")
    del loaded
    overhead_num = overhead_den = 0.0
    for job in jobs:
        plan = settings.tiles.plan(job.shape, multiple)
        overhead_num += block_overhead(job.shape, settings.block, plan) * plan.n_tiles
        overhead_den += plan.n_tiles
    overhead = overhead_num / max(overhead_den, 1.0)
    total = sum(j.n_blocks for j in jobs)
    already = sum(len(j.done) for j in jobs)
    skipped = [j.final for j in jobs if j.state == "done"]
    for j in jobs:
        if j.state == "done":
            progress.log(f"{j.name}: already restored with these settings, kept {j.final}")
    result = BatchResult(outputs=list(skipped), blocks_total=total, blocks_run=0,
                         blocks_already_done=already, skipped=skipped, failed={},
                         elapsed_s=0.0, workers=0, overhead=overhead)
    todo = [j for j in jobs if j.state != "done"]
    if not todo:
        result.elapsed_s = time.perf_counter() - t_start
        return result
    if overhead > 1.5:
        progress.log(f"blocks of {settings.block} restore {overhead:.1f}x the tiles of a "
                     f"single pass (tiles at block borders are done twice); a larger "
                     "--block lowers this")

    own_cluster, cpu_threads = None, None
    if client is None:
        from cryowae.inference.cluster import count_gpus, make_cluster

        own_cluster = make_cluster(cluster, slurm_cfg, workers)
        client = Client(own_cluster)
        if cluster == "local":  # CPU workers share this machine's cores
            cpu_threads = max(1, (os.cpu_count() or 1) // (workers or max(1, count_gpus())))
    try:
        client.register_plugin(DevicePlugin(cpu_threads), name=DevicePlugin.name)
        if cluster == "slurm" and own_cluster is not None:
            progress.log(f"SLURM jobs submitted; blocks start as workers join (dashboard: "
                         f"{getattr(own_cluster, 'dashboard_link', '-')})")
        # a client of ours has the BLOCK resource on every worker; someone else's may not
        block_resources = {BLOCK_RESOURCE: 1} if own_cluster is not None or any(
            BLOCK_RESOURCE in (w.get("resources") or {})
            for w in client.scheduler_info().get("workers", {}).values()) else None
        run_id = uuid.uuid4().hex[:8]
        ac = as_completed()
        info: dict[Any, tuple[str, TomogramJob, str]] = {}
        pending: dict[str, int] = {}
        all_futures: dict[str, list[Any]] = {}

        def submit(fn: Any, arg: Any, kind: str, job: TomogramJob, key: str,
                   priority: int, resources: dict[str, int] | None = None) -> None:
            label = job.name.replace("/", "_")  # names may hold folders (TS_01/tomo)
            fut = client.submit(fn, arg,
                                key=f"cryowae-{kind}-{job.index}-{label}-{key}-{run_id}",
                                priority=priority, resources=resources, retries=1)
            info[fut] = (kind, job, key)
            all_futures.setdefault(job.name, []).append(fut)
            ac.add(fut)

        def submit_finalize(job: TomogramJob) -> None:
            task = FinalizeTask(
                partial=str(job.partial), final=str(job.final), shape=job.shape,
                voxel_size=job.voxel_size, origin=job.origin, levels=settings.levels,
                chunk=settings.out_chunk, attrs=job.attrs(),
                mrc=str(job.mrc) if job.mrc is not None else None, mrc_meta=job.mrc_meta,
                write_zarr=job.state != "mrc")
            submit(finalize_tomogram, task, "finish", job, "all", 1000 - job.index)

        def submit_blocks(job: TomogramJob) -> None:
            if not job.partial.exists():
                create_partial(job, settings)
            left = [c for c in job.cores if block_id(c, settings.block) not in job.done]
            pending[job.name] = len(left)
            if not left:
                submit_finalize(job)
                return
            for core in left:
                bid = block_id(core, settings.block)
                task = BlockTask(input=str(job.input), store=str(job.partial),
                                 shape=job.shape, core=core, bid=bid,
                                 model=str(settings.model), tiles=settings.tiles,
                                 norm=job.norm)  # type: ignore[arg-type]
                submit(restore_block, task, "block", job, bid, -job.index, block_resources)

        progress.start(total, "restoring blocks", done=already)
        for job in todo:
            if job.state in ("finish", "mrc"):
                submit_finalize(job)
            elif job.norm is None:
                submit(tomogram_norm, str(job.input), "norm", job, "stats", 500 - job.index)
            else:
                submit_blocks(job)
        for fut in ac:
            kind, job, key = info.pop(fut)
            if progress.cancelled:
                for futs in all_futures.values():
                    client.cancel(futs)
                raise Cancelled("restore-batch cancelled; finished blocks are kept for a "
                                "rerun")
            if job.name in result.failed:
                continue
            if fut.status != "finished":
                exc = fut.exception() if fut.status == "error" else None
                what = f"block {key}" if kind == "block" else kind
                result.failed[str(job.input)] = f"{what}: {_error_line(exc)}"
                client.cancel(all_futures.get(job.name, []))
                progress.log(f"{job.name}: failed ({what}: {_error_line(exc)}); its finished "
                             "blocks are kept for a rerun")
                continue
            if kind == "norm":
                job.norm = tuple(float(v) for v in fut.result())
                submit_blocks(job)
            elif kind == "block":
                fut.release()
                result.blocks_run += 1
                job.done.add(key)
                pending[job.name] -= 1
                progress.advance(1)
                if pending[job.name] == 0:
                    submit_finalize(job)
            else:
                result.outputs.append(job.final)
                progress.log(f"{job.name}: finished {job.final}"
                             + (f" and {job.mrc}" if job.mrc is not None else ""))
        result.workers = len(client.scheduler_info().get("workers", {}))
    finally:
        progress.finish()
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    result.elapsed_s = time.perf_counter() - t_start
    return result


__all__ = ["BatchResult", "restore_batch"]
