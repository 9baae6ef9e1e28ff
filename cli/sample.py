"""`cryowae sample`: a posterior family of restorations that all agree with the data."""

from __future__ import annotations

from pathlib import Path

import typer


def sample(
    model: Path = typer.Argument(..., help="Trained model (model.pt or its run directory).",
                                 show_default=False),
    tomogram: Path = typer.Argument(..., help="Tomogram to sample (MRC or OME-Zarr).",
                                    show_default=False),
    n: int = typer.Option(16, "--n", help="Number of samples (family size)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default: "
                             "<tomogram name>_family)."),
    sampler: str = typer.Option("ot", "--sampler", help="ot (entropic OT plan, default), "
                                "gaussian (code + noise), rotations (test-time rotations) "
                                "or ensemble (one sample per --ensemble-model)."),
    epsilon: float = typer.Option(0.5, "--epsilon", help="Diversity knob. ot: entropic "
                                  "temperature relative to the prior's scale (smaller: "
                                  "fewer codes per tile, less spread); gaussian: noise std "
                                  "in prior sigmas."),
    consistency: str = typer.Option("auto", "--consistency", help="auto (soft with "
                                    "--even/--odd, else hard), hard (measured Fourier "
                                    "region = the data, noise included), soft (noise-aware, "
                                    "needs --even and --odd) or none."),
    even: Path = typer.Option(None, "--even", help="Even half tomogram (for soft)."),
    odd: Path = typer.Option(None, "--odd", help="Odd half tomogram (for soft)."),
    ensemble_model: list[Path] = typer.Option(None, "--ensemble-model", help="Further "
                                              "model(s) for --sampler ensemble (repeat)."),
    interpolation: float = typer.Option(1.0, "--interpolation", help="ot: decode with "
                                        "z_i + t (z_j - z_i); 1 uses the drawn code."),
    prior: str = typer.Option("auto", "--prior", help="ot target codes: auto, gaussian, "
                              "codes (training codes) or mixed."),
    tilt_min: float = typer.Option(None, "--tilt-min", help="Lowest tilt (degrees); "
                                   "default: the model's."),
    tilt_max: float = typer.Option(None, "--tilt-max", help="Highest tilt (degrees); "
                                   "default: the model's."),
    tile: int = typer.Option(96, "--tile", help="Cubic tile size (voxels)."),
    overlap: int = typer.Option(32, "--overlap", help="Tile overlap (voxels)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Tiles per network call."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Sample N plausible restorations of TOMOGRAM with MODEL: they agree with the measured
    data and differ where the missing wedge leaves the structure undetermined. Writes
    samples.zarr (s, z, y, x), mean.mrc, std.mrc and family.json to --out."""
    import json

    from cryowae.cli.common import out_console
    from cryowae.cli.progress import RichProgress
    from cryowae.errors import CryowaeInputError
    from cryowae.io.atomic import check_output_path
    from cryowae.physics.wedge import check_tilt_range
    from cryowae.sampling.family import SAMPLERS, sample_file

    if sampler not in SAMPLERS:
        raise CryowaeInputError(f"unknown --sampler {sampler!r}: choose from "
                                f"{', '.join(SAMPLERS)}")
    if consistency not in ("auto", "hard", "soft", "none"):
        raise CryowaeInputError(f"unknown --consistency {consistency!r}: auto, hard, soft "
                                "or none")
    if (even is None) != (odd is None):
        raise CryowaeInputError("give both --even and --odd, or neither")
    if consistency == "auto":
        # hard consistency puts the measured noise back into every sample (Pearson to
        # ground truth of the family mean 0.27 against 0.65 with soft, docs/benchmarks.md)
        consistency = "soft" if even is not None else "hard"
    if n < 1:
        raise CryowaeInputError(f"--n must be positive, got {n}")
    if tile < 8 or overlap < 0 or batch_size < 1:
        raise CryowaeInputError("--tile must be >= 8, --overlap >= 0, --batch-size >= 1")
    for p in [model, tomogram, even, odd, *(ensemble_model or [])]:
        if p is not None and not p.exists():
            raise CryowaeInputError(f"{p}: no such file or directory")
    if ensemble_model and sampler != "ensemble":
        raise CryowaeInputError("--ensemble-model is for --sampler ensemble")
    if sampler == "ensemble" and not ensemble_model:
        raise CryowaeInputError("--sampler ensemble needs at least one --ensemble-model "
                                "besides MODEL")
    tilt_range = None
    if tilt_min is not None or tilt_max is not None:
        if tilt_min is None or tilt_max is None:
            raise CryowaeInputError("give both --tilt-min and --tilt-max, or neither")
        check_tilt_range(tilt_min, tilt_max)
        tilt_range = (tilt_min, tilt_max)
    out_dir = out or Path(f"{tomogram.name.split('.')[0]}_family")
    check_output_path(out_dir, overwrite)  # refuse early, before any computation
    models = [model, *(ensemble_model or [])]
    result = sample_file(models if sampler == "ensemble" else model, tomogram, out_dir,
                         n_samples=n, sampler=sampler, epsilon=epsilon,
                         consistency=consistency, tile=tile, overlap=overlap,
                         batch_size=batch_size, seed=seed, device=device, even=even,
                         odd=odd, interpolation=interpolation, prior=prior,
                         tilt_range=tilt_range, overwrite=overwrite,
                         progress=RichProgress())
    meta = json.loads((result / "family.json").read_text())
    fig = meta.get("figures", {})
    cons = meta.get("consistency", {})
    line = (f"{meta['n_samples']} samples ({sampler}, consistency {cons.get('mode')}): "
            f"mean voxel std {fig.get('voxel_std_relative', float('nan')):.3g} x the "
            f"tomogram's std")
    eff = meta.get("ot", {}).get("effective_codes_per_tile")
    if eff:
        line += f"; {eff['mean']:.1f} effective codes per tile (epsilon {epsilon:g})"
    out_console.print(line)
    if cons.get("requested") != cons.get("mode"):
        out_console.print(f"note: {cons.get('reason')}")
    out_console.print(f"family:  {result / 'samples.zarr'}  (axes s, z, y, x)")
    out_console.print(f"mean:    {result / 'mean.mrc'}    std: {result / 'std.mrc'}")
    if "noise_std" in meta.get("files", {}):
        out_console.print(f"noise:   {result / 'noise_std.mrc'}  (the data's own noise, "
                          "from --even/--odd; not part of std.mrc)")
    out_console.print(f"details: {result / 'family.json'}")
    out_console.print(f"open in napari:  cryowae view {result}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)
