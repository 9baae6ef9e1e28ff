"""`cryowae sample`: a posterior family of restorations, checked against the data."""

from __future__ import annotations

from pathlib import Path

import typer

from cryowae.cli.common import VOXEL_SIZE_OPTION


def sample(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help="Trained model (model.pt or its run directory).",
                                 show_default=False),
    tomograms: list[Path] = typer.Argument(..., help="Tomogram(s) to sample (MRC or "
                                           "OME-Zarr): paths, quoted globs, @list.txt or "
                                           "CryoET Data Portal dataset/run folders.",
                                           show_default=False),
    n: int = typer.Option(16, "--n", help="Number of samples (family size)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: "
                             "<tomogram name>_family); with several tomograms the folder "
                             "of their families (default: families), one per tomogram "
                             "named like restore-batch's outputs (TS_01/tomo when file "
                             "names repeat)."),
    sampler: str = typer.Option("prior", "--sampler", help="prior (latent fields of the "
                                "model's stochastic branch, default), rotations (test-time "
                                "rotations) or ensemble (one sample per --ensemble-model)."),
    consistency: str = typer.Option("check", "--consistency", help="check (residual "
                                    "against the data over the noise, per shell; the "
                                    "samples are never overwritten) or none."),
    spread_calibration: str = typer.Option(
        "auto", "--spread-calibration", help="Widen the family per resolution shell to "
        "its estimated error (docs/benchmarks.md, Spread recalibration): halves (noise "
        "from --even/--odd), data (noise estimated from the tomogram), none; auto: "
        "halves when given, else data."),
    local_spread: bool = typer.Option(
        True, "--local-spread/--no-local-spread", help="After the per-shell calibration, "
        "scale each sample's deviation from the mean by a gain g(x) so that the std "
        "follows where the restoration is likely wrong: the local power of what the data "
        "measured of it (docs/benchmarks.md, Local spread)."),
    even: Path = typer.Option(None, "--even", help="Even half tomogram (noise power "
                              "for the check and the spread calibration)."),
    odd: Path = typer.Option(None, "--odd", help="Odd half tomogram."),
    ensemble_model: list[Path] = typer.Option(None, "--ensemble-model", help="Further "
                                              "model(s) for --sampler ensemble (repeat)."),
    tilt_min: float = typer.Option(None, "--tilt-min", help="Lowest tilt (degrees); "
                                   "default: a tilt file next to TOMOGRAM, else the model's."),
    tilt_max: float = typer.Option(None, "--tilt-max", help="Highest tilt (degrees)."),
    tilt_axis: str = typer.Option(None, "--tilt-axis", help="Tilt axis y or x "
                                  "[default: the model's]."),
    tilt_file: Path = typer.Option(None, "--tilt-file", help="Tilt angles (.tlt/.rawtlt)."),
    tile: int = typer.Option(96, "--tile", help="Cubic tile size (voxels)."),
    overlap: int = typer.Option(32, "--overlap", help="Tile overlap (voxels)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per network call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast: on CUDA "
                             "[default: on]; on a CPU with bf16 instructions when given "
                             "[default: off], else ignored (said in one line)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="channels_last_3d "
                                       "memory layout of the branch that decodes every "
                                       "sample (--sampler prior)."),
    seed: int = typer.Option(0, "--seed", help="Sample s is drawn from (seed, s)."),
    keep: int = typer.Option(None, "--keep", help="Store the first K samples in "
                             "samples.zarr [default: all N]; mean, std, calibration and "
                             "check still use all N."),
    sample_dtype: str = typer.Option("float16", "--sample-dtype", help="dtype of "
                                     "samples.zarr: float16 (half the size; float32 when "
                                     "the tomogram's values would lose precision) or "
                                     "float32. Mean and std come from float32 samples."),
    std_dtype: str = typer.Option("float16", "--std-dtype", help="dtype of std.mrc: "
                                  "float16 (MRC mode 12) or float32; mean.mrc is float32."),
    compression: str = typer.Option("zstd", "--compression", help="Chunk codec of "
                                    "samples.zarr: zstd or none."),
    pyramid: bool = typer.Option(False, "--pyramid/--no-pyramid", help="Also store 2x "
                                 "and 4x downsampled samples (about 14% more)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    voxel_size: float = VOXEL_SIZE_OPTION,
) -> None:
    """Sample N plausible restorations of TOMOGRAMS with MODEL: each a coherent whole,
    differing where the missing wedge leaves the structure undetermined. Writes
    samples.zarr (s, z, y, x; float16, zstd, chunks of one sample x 4 slices x 256 x
    256 voxels, no pyramid), mean.mrc (float32), std.mrc (float16) and family.json to
    --out (one such folder per tomogram under --out when there are several): 16 samples
    take about 9 tomogram sizes or less on disk (docs/benchmarks.md). Ends with one
    self-check line (the spread against the data's own error estimates; a WARNING on
    stderr when it does not match). An interrupted run continues where it stopped when
    run again."""
    import json

    from cryowae.cli.common import err_console, out_console, resolve_geometry, use_voxel_size
    from cryowae.cli.progress import RichProgress
    from cryowae.data.inputs import expand_inputs, output_names
    from cryowae.devices import resolve_device
    from cryowae.errors import CryowaeInputError
    from cryowae.io.atomic import check_output_path
    from cryowae.models.checkpoint import load_restorer
    from cryowae.precision import amp_note
    from cryowae.sampling import sample_file
    from cryowae.sampling.consistency import family_lines
    from cryowae.sampling.local_spread import LocalSpreadSettings
    from cryowae.sampling.settings import (
        CalibrationSettings,
        SamplerSettings,
        StorageSettings,
    )
    from cryowae.tiling.settings import TileSettings

    sampling = SamplerSettings(n, sampler, TileSettings(tile, overlap, batch_size), seed,
                               amp=amp, channels_last=channels_last)
    calibration = CalibrationSettings(spread_calibration, consistency)
    storage = StorageSettings(sample_dtype=sample_dtype, keep=keep, compression=compression,
                              pyramid=pyramid, std_dtype=std_dtype, overwrite=overwrite)
    local = LocalSpreadSettings(enabled=local_spread)
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    for p in [model, even, odd, tilt_file, *(ensemble_model or [])]:
        if p is not None and not p.exists():
            raise CryowaeInputError(f"{p}: no such file or directory")
    if ensemble_model and sampler != "ensemble":
        raise CryowaeInputError("--ensemble-model is for --sampler ensemble")
    if sampler == "ensemble" and not ensemble_model:
        raise CryowaeInputError("--sampler ensemble needs at least one --ensemble-model "
                                "besides MODEL")
    inputs = expand_inputs(tomograms, what="tomogram")  # globs, list files, Portal folders
    for note in inputs.notes:
        err_console.print(note, soft_wrap=True, markup=False, highlight=False)
    if len(inputs.paths) > 1 and even is not None:
        raise CryowaeInputError("--even/--odd belong to one tomogram; sample several "
                                "tomograms without them")
    names = output_names(inputs.paths)
    if len(set(names)) < len(names):
        raise CryowaeInputError(f"two inputs have one output name ({names}); rename one")
    out_dirs = ([out or Path(f"{inputs.paths[0].name.split('.')[0]}_family")]
                if len(names) == 1 else [(out or Path("families")) / nm for nm in names])
    for out_dir in out_dirs:
        check_output_path(out_dir, overwrite)  # refuse early, before any computation
    dev = resolve_device(device)
    note = amp_note(dev, amp)
    if note:
        err_console.print(note, soft_wrap=True, highlight=False, markup=False)
    restorers = [load_restorer(p, dev) for p in [model, *(ensemble_model or [])]]
    use_voxel_size(ctx, voxel_size, *inputs.paths)
    for tomogram, out_dir in zip(inputs.paths, out_dirs, strict=True):
        geometry = resolve_geometry(tomogram, tilt_min, tilt_max, tilt_file, tilt_axis,
                                    fallback=restorers[0].geometry)
        result = sample_file(restorers if sampler == "ensemble" else restorers[0], tomogram,
                             out_dir, sampling, calibration, storage, local, even=even,
                             odd=odd,
                             geometry=geometry, device=device, progress=RichProgress())
        meta = json.loads((result / "family.json").read_text())
        out_console.print(f"{tomogram}: {meta['n_samples']} samples ({sampler}, "
                          f"{meta['samples_stored']} stored as {meta['sample_dtype']}): mean voxel "
                          f"std {meta['voxel_std_relative']:.3g} x the tomogram's std",
                          soft_wrap=True, highlight=False)
        for line in family_lines(meta):
            out_console.print(line)
        cal = meta.get("spread_calibration", {})
        if cal.get("factors"):
            f = cal["factors"]["measured"]
            out_console.print(f"spread calibration ({cal['mode']}): factors "
                              f"{min(f):.2f}..{max(f):.2f} per shell", highlight=False)
        gain = meta["local_spread"].get("gain")
        if gain:
            out_console.print(f"local spread: gain {gain['gain_min']:.2f}.."
                              f"{gain['gain_max']:.2f} over the tomogram", highlight=False)
        check = meta["self_check"]["line"]
        (err_console if check.startswith("WARNING") else out_console).print(
            check, soft_wrap=True, markup=False, highlight=False)
        out_console.print(f"family:  {result / 'samples.zarr'}  (axes s, z, y, x)")
        out_console.print(f"mean:    {result / 'mean.mrc'}    std: {result / 'std.mrc'}")
        out_console.print(f"details: {result / 'family.json'}")
        out_console.print(f"open in napari:  cryowae view {result}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
