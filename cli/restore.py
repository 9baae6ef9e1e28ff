"""`cryowae restore`: restore a whole tomogram with a trained model (tiled, seam-free)."""

from __future__ import annotations

from pathlib import Path

import typer

from cryowae.cli.common import VOXEL_SIZE_OPTION


def restore(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Trained model: model.pt or its run directory.",
                                 show_default=False),
    tomogram: Path = typer.Argument(..., help="Tomogram to restore (MRC or OME-Zarr).",
                                    show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output: .mrc (or .rec, .map) for "
                             "float32 MRC, .zarr for OME-Zarr.", show_default=False),
    even: Path | None = typer.Option(None, "--even", help="Even-tilt half tomogram."),
    odd: Path | None = typer.Option(None, "--odd", help="Odd-tilt half tomogram."),
    halves: str = typer.Option(None, "--halves", help="With --even/--odd: 'full' "
                               "restores the full tomogram in one pass (default: measured "
                               "as good as or better than averaging, at half the cost; see "
                               "cryowae.inference.restore.DEFAULT_HALVES_MODE), 'average' "
                               "restores each half and averages the two."),
    tile: int = typer.Option(96, "--tile", help="Tile edge in voxels (rounded up to what "
                             "the model needs)."),
    overlap: int = typer.Option(32, "--overlap", help="Overlap of neighbouring tiles in "
                                "voxels (about a third of the tile)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Tiles per forward pass "
                                   "(halved automatically when memory runs out) "
                                   "[default: from free GPU memory on CUDA, 4 on CPU]."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast: on CUDA "
                             "[default: on]; on a CPU with bf16 instructions when given "
                             "[default: off], else ignored (said in one line)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the network "
                                  "(falls back to eager with one line if it fails)."),
    compile_backend: str = typer.Option("inductor", "--compile-backend",
                                        help="torch.compile backend."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last_3d "
                                       "memory layout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    tilt_min: float = typer.Option(None, "--tilt-min", help="Lowest tilt (degrees) of "
                                   "this tomogram, to check it against the model's."),
    tilt_max: float = typer.Option(None, "--tilt-max", help="Highest tilt (degrees)."),
    tilt_axis: str = typer.Option(None, "--tilt-axis", help="Tilt axis: y or x."),
    tilt_file: Path = typer.Option(None, "--tilt-file", help="Tilt angles (.tlt/.rawtlt) "
                                   "[default: <name>.tlt next to the tomogram]."),
    voxel_size: float = VOXEL_SIZE_OPTION,
) -> None:
    """Restore TOMOGRAM with MODEL: missing-wedge filling and denoising, tile by tile with
    blended overlaps, in memory bounded by one slab of tiles."""
    import time

    from cryowae.cli.common import err_console, out_console, use_voxel_size
    from cryowae.cli.progress import RichProgress
    from cryowae.devices import resolve_device
    from cryowae.inference.restore import DEFAULT_HALVES_MODE, restore_file, throughput
    from cryowae.io import read_volume
    from cryowae.precision import ComputeSettings, amp_note

    note = amp_note(resolve_device(device), amp)
    if note:
        err_console.print(note, soft_wrap=True, highlight=False, markup=False)
    compute = ComputeSettings(amp=amp, channels_last=channels_last,
                              compile=compile_, compile_backend=compile_backend)

    geometry = None
    if any(v is not None for v in (tilt_min, tilt_max, tilt_axis, tilt_file)):
        from cryowae.physics.geometry import TiltGeometry

        geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                        tilt_file=tilt_file, axis=tilt_axis,
                                        tomogram=tomogram)
    use_voxel_size(ctx, voxel_size, tomogram)
    t0 = time.perf_counter()
    path = restore_file(model, tomogram, out, even=even, odd=odd, tile=tile, overlap=overlap,
                        batch_size=batch_size, device=device, overwrite=overwrite,
                        progress=RichProgress(), halves=halves or DEFAULT_HALVES_MODE,
                        geometry=geometry, compute=compute)
    elapsed = time.perf_counter() - t0
    with read_volume(path) as vol:
        shape = vol.shape
    out_console.print(f"restored {'x'.join(map(str, shape))} voxels in {elapsed:.1f} s "
                      f"({throughput(shape, elapsed) / 1e6:.3g} Mvoxel/s)", highlight=False)
    out_console.print(f"output: {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("restore")(restore)
