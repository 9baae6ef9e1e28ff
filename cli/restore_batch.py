"""`cryowae restore-batch`: restore many tomograms on a Dask cluster (local or SLURM)."""

from __future__ import annotations

from pathlib import Path

import typer


def restore_batch(
    inputs: list[str] = typer.Argument(..., help="Tomograms to restore (MRC or OME-Zarr): "
                                       "paths, quoted globs ('TS_*/tomo.mrc', "
                                       "'data/**/*.mrc'), @list.txt or list.txt (one "
                                       "per line, # comments) or CryoET Data Portal "
                                       "dataset/run folders."),
    model: Path = typer.Option(..., "--model", "-m", help="model.pt, or a run directory "
                               "holding one."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: NAME.zarr per "
                             "tomogram (NAME.zarr.partial while unfinished); NAME is "
                             "the file name without suffix, or TS_01/tomo (the path "
                             "under the inputs' common folder) when file names repeat."),
    cluster: str = typer.Option("local", "--cluster", help="local (this machine: one "
                                "worker per GPU, or one CPU worker) or slurm "
                                "(dask-jobqueue)."),
    cluster_config: Path = typer.Option(None, "--cluster-config", help="SLURM settings "
                                        "(YAML; default: the shipped "
                                        "configs/cluster-slurm.yaml)."),
    workers: int = typer.Option(None, "--workers", help="Number of workers (local: "
                                "default one per GPU; slurm: default from the config)."),
    block: int = typer.Option(256, "--block", help="Edge of a block's core (voxels), a "
                              "multiple of the output chunk; larger blocks redo fewer "
                              "tiles at block borders."),
    chunk: int = typer.Option(None, "--chunk", help="Output zarr chunk edge (default 64, "
                              "or --block when 64 does not divide it)."),
    tile: int = typer.Option(96, "--tile", help="Tile edge (voxels)."),
    overlap: int = typer.Option(32, "--overlap", help="Minimum overlap of tiles (voxels)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass."),
    window: str = typer.Option("cosine", "--window", help="Blending window: cosine, "
                               "gaussian or flat."),
    levels: int = typer.Option(3, "--levels", help="OME-Zarr pyramid levels."),
    mrc: bool = typer.Option(False, "--mrc", help="Also write NAME.mrc."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace finished outputs."),
) -> None:
    """Restore INPUTS block by block on a Dask cluster; a rerun resumes an interrupted
    batch and redoes only the missing blocks."""
    from cryowae.cli.common import err_console, out_console
    from cryowae.cli.progress import RichProgress
    from cryowae.inference.batch import restore_batch as run

    result = run(inputs, model, out, block=block, chunk=chunk, tile=tile, overlap=overlap,
                 batch_size=batch_size, window=window, levels=levels, mrc=mrc,
                 overwrite=overwrite, cluster=cluster, cluster_config=cluster_config,
                 workers=workers, progress=RichProgress())
    out_console.print(result.summary(), soft_wrap=True, highlight=False)
    if result.failed:
        for inp, why in result.failed.items():
            err_console.print(f"cryowae: error: {inp}: {why}", soft_wrap=True, markup=False,
                              highlight=False)
        err_console.print(f"cryowae: error: {len(result.failed)} tomogram(s) failed; rerun the "
                          "same command to retry them (finished blocks are kept)",
                          soft_wrap=True, highlight=False)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("restore-batch")(restore_batch)
