"""`cryowae train`: self-supervised training of a WAE restorer on the user's tomograms."""

from __future__ import annotations

from pathlib import Path

import typer

from cryowae.cli.common import VOXEL_SIZE_OPTION


def train(
    ctx: typer.Context,
    tomograms: list[Path] = typer.Argument(..., help="Tomogram(s) to learn from (MRC or "
                                           "OME-Zarr): paths, quoted globs, @list.txt or "
                                           "CryoET Data Portal dataset/run folders."),
    out: Path = typer.Option(None, "--out", "-o", help="Run directory (default: "
                             "runs/<first tomogram's name>)."),
    even: list[Path] = typer.Option(None, "--even", help="Even-tilt half tomogram(s), one "
                                    "per tomogram: enables noise2noise."),
    odd: list[Path] = typer.Option(None, "--odd", help="Odd-tilt half tomogram(s)."),
    tilt_min: float = typer.Option(None, "--tilt-min", help="Lowest tilt (degrees)."),
    tilt_max: float = typer.Option(None, "--tilt-max", help="Highest tilt (degrees)."),
    tilt_file: Path = typer.Option(None, "--tilt-file", help=".tlt/.rawtlt file of angles. "
                                   "Without it or --tilt-min/--tilt-max: a tilt file next "
                                   "to the first tomogram (<stem>.tlt, <stem>.rawtlt, "
                                   "tilts.tlt), else the config's geometry, else -60..60 "
                                   "with a warning; --resume keeps the run's."),
    tilt_axis: str = typer.Option(None, "--tilt-axis", help="Tilt axis: y or x "
                                  "[default: the config's, else y]."),
    config: str = typer.Option(None, "--config", "-c", help="YAML file or preset "
                               "(cpu-small, gpu-default, gpu-large). Default: by device "
                               "(gpu-default on CUDA, cpu-small on CPU; said in one line), "
                               "or the run's own config with --resume."),
    divergence: str = typer.Option(None, "--divergence", help="Latent matching of the "
                                   "codes: mmd, sinkhorn, sliced, adversarial or none "
                                   "[default: none]."),
    kernel: str = typer.Option(None, "--kernel", help="MMD kernel: imq (default) or rbf."),
    lam: float = typer.Option(None, "--lambda", help="Weight of the latent divergence "
                              "relative to the reconstruction term (auto-balanced)."),
    steps: int = typer.Option(None, "--steps", help="Optimiser steps."),
    minutes: float = typer.Option(None, "--minutes", help="Wall-clock budget in minutes."),
    batch_size: int = typer.Option(None, "--batch-size"),
    patch_size: int = typer.Option(None, "--patch-size"),
    latent_dim: int = typer.Option(None, "--latent-dim", help="Dimension of the latent "
                                   "code (the restorer's latent_dim)."),
    prior: str = typer.Option(None, "--prior", help="gaussian or reference."),
    reference: list[Path] = typer.Option(None, "--reference", help="Clean reference maps "
                                         "(MRC) for --prior reference."),
    family: bool = typer.Option(None, "--family/--no-family", help="Train the "
                                "posterior-family branch (samples for `cryowae sample`) "
                                "[default: the config's, on]."),
    samples_per_input: int = typer.Option(None, "--samples-per-input", help="Family "
                                          "samples per input m (1: the squared-error "
                                          "ablation) [default: 2]."),
    score: str = typer.Option(None, "--score", help="Energy-score variant: whole, shells, "
                              "regions, shell_regions, blocks or coefficients "
                              "[default: shell_regions]."),
    posterior_matching: bool = typer.Option(None, "--posterior-matching/"
                                            "--no-posterior-matching", help="Posterior "
                                            "branch with joint latent matching "
                                            "[default: off]."),
    matching_divergence: str = typer.Option(None, "--matching-divergence", help="Its "
                                            "divergence: mmd, sinkhorn, sliced or "
                                            "adversarial [default: mmd]."),
    branch_batch: int = typer.Option(None, "--branch-batch", help="Patches of each batch "
                                     "the family branch trains on (0: all) [default: 1]."),
    branch_every: int = typer.Option(None, "--branch-every", help="The family branch "
                                     "trains on every k-th step [default: 4]."),
    family_noise: str = typer.Option(None, "--family-noise", help="Target noise of the "
                                     "score: auto (halves when given, else estimated), "
                                     "halves or estimate."),
    validation: bool = typer.Option(None, "--validation/--no-validation", help="Hold a "
                                    "slab of each tomogram out of training and log the "
                                    "loss on it (val_loss) [default: the config's, on]."),
    until_plateau: bool = typer.Option(None, "--until-plateau/--no-until-plateau",
                                       help="Stop when the "
                                       "validation loss has plateaued (--minutes or "
                                       "--steps is the ceiling); model.pt is written as "
                                       "at a normal end."),
    val_every: int = typer.Option(None, "--val-every", help="Steps between validation "
                                  "evaluations [default: 10]."),
    val_crops: int = typer.Option(None, "--val-crops", help="Held-out subtomograms the "
                                  "validation loss averages [default: 8]."),
    holdout: float = typer.Option(None, "--holdout", help="Fraction of the longest "
                                  "lateral axis held out for validation, at least one "
                                  "patch [default: 0.1]."),
    ema_decay: float = typer.Option(None, "--ema-decay", help="Decay of the running "
                                    "average of the weights that validation scores and "
                                    "model.pt stores (about the last 1/(1-d) steps; 0: "
                                    "the last step's weights) [default: 0.99]."),
    seed: int = typer.Option(None, "--seed"),
    device: str = typer.Option(None, "--device", help="auto, cpu or cuda."),
    amp: bool = typer.Option(None, "--amp/--no-amp", help="bf16 autocast: on CUDA "
                             "[default: the config's, on]; on a CPU with bf16 "
                             "instructions when given [default: off], else ignored "
                             "(said in one line)."),
    compile_: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the "
                                  "network (falls back to eager with one line if it "
                                  "fails) [default: off]."),
    compile_backend: str = typer.Option(None, "--compile-backend", help="torch.compile "
                                        "backend [default: inductor]."),
    channels_last: bool = typer.Option(None, "--channels-last/--no-channels-last",
                                       help="channels_last_3d memory layout "
                                       "[default: off]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    voxel_size: float = VOXEL_SIZE_OPTION,
) -> None:
    """Train a restorer on TOMOGRAMS alone (no ground truth needed)."""
    import dataclasses

    from cryowae.cli.common import err_console, out_console, resolve_geometry, use_voxel_size
    from cryowae.cli.progress import RichProgress
    from cryowae.data.inputs import expand_inputs, input_stem
    from cryowae.devices import preset_for, resolve_device
    from cryowae.errors import CryowaeInputError
    from cryowae.io import read_volume
    from cryowae.precision import amp_note
    from cryowae.report import training_curve
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train as run_training

    inputs = expand_inputs(tomograms, what="tomogram")  # globs, list files, Portal folders
    for note in inputs.notes:
        err_console.print(note, soft_wrap=True, markup=False, highlight=False)
    tomograms = inputs.paths
    even = expand_inputs(even, what="even half").paths if even else []
    odd = expand_inputs(odd, what="odd half").paths if odd else []
    run_dir = out or Path("runs") / input_stem(tomograms[0])
    if resume:
        if not (run_dir / "checkpoint.pt").is_file():
            raise CryowaeInputError(f"--resume: no checkpoint.pt in {run_dir}")
        cfg = load_config(config or run_dir / "config.yaml")
    else:
        if (run_dir / "checkpoint.pt").exists():
            raise CryowaeInputError(f"{run_dir} already holds a run; pass --resume to "
                                    "continue it or choose another --out")
        if config is None:
            config = preset_for(resolve_device(device or "auto"))
            err_console.print(f"no --config: using preset {config} (device "
                              f"{resolve_device(device or 'auto')})", soft_wrap=True,
                              highlight=False, markup=False)
        cfg = load_config(config)
    if resume and tilt_file is None and tilt_min is None and tilt_max is None:
        geometry = cfg.geometry  # the run's own
        if tilt_axis is not None:
            geometry = dataclasses.replace(geometry, axis=tilt_axis, source="options")
    else:
        given = cfg.geometry if cfg.geometry.source != "default" else None
        geometry = resolve_geometry(tomograms[0], tilt_min, tilt_max, tilt_file, tilt_axis,
                                    fallback=given)
    if prior is None and reference:
        prior = "reference"
    cfg = cfg.replace(geometry=geometry, divergence=divergence, kernel=kernel,
                      lambda_=lam, steps=steps, minutes=minutes, batch_size=batch_size,
                      patch_size=patch_size, latent_dim=latent_dim, prior=prior, seed=seed,
                      device=device, amp=amp, compile=compile_, ema_decay=ema_decay,
                      compile_backend=compile_backend, channels_last=channels_last)
    note = amp_note(resolve_device(cfg.device), amp, cfg.amp)
    if note:
        err_console.print(note, soft_wrap=True, highlight=False, markup=False)
    fam = {k: v for k, v in {"enabled": family, "samples": samples_per_input,
                              "branch_batch": branch_batch, "branch_every": branch_every,
                              "score": score, "posterior_matching": posterior_matching,
                              "matching_divergence": matching_divergence,
                              "noise": family_noise}.items() if v is not None}
    if fam:
        cfg = cfg.replace(family=cfg.family.to_dict() | fam)
    val = {k: v for k, v in {"enabled": validation, "every": val_every, "crops": val_crops,
                              "holdout": holdout,
                              "until_plateau": until_plateau}.items()
           if v is not None}
    if val:
        cfg = cfg.replace(validation=cfg.validation.to_dict() | val)
    if minutes is not None and steps is None:
        cfg = cfg.replace(steps=10**9)
    progress = RichProgress()
    use_voxel_size(ctx, voxel_size, *tomograms)
    sources = load_sources(list(tomograms), list(even or []), list(odd or []),
                           min_size=cfg.patch_size, geometry=cfg.geometry, progress=progress)
    refs = [read_volume(r, check_nan=True).numpy() for r in (reference or [])]
    result = run_training(sources, cfg, run_dir, resume=resume, references=refs or None,
                          progress=progress)
    if result.rank != 0:
        return
    out_console.print(f"trained {result.steps} steps in {result.elapsed_s / 60:.1f} min "
                      f"({result.mode}); final loss {result.final.get('loss', float('nan')):.4g}, "
                      f"MMD to prior {result.final.get('mmd_to_prior', float('nan')):.4g}"
                      + (f"; family MMD {result.final['family_mmd']:.3g} (null band "
                         f"{result.final['family_mmd_null']:.3g})"
                         if "family_mmd" in result.final else ""))
    if "val_loss" in result.final:
        plateau = result.final["plateau_step"]
        out_console.print(f"validation loss {result.final['val_loss']:.4g}; "
                          + (f"plateau at step {int(plateau)}" if plateau == plateau
                             else "no plateau yet"))
    curve = training_curve(run_dir / "metrics.csv", run_dir / "training_curve.png",
                           plateau_step=result.final.get("plateau_step"))
    out_console.print(f"model: {run_dir / 'model.pt'}   metrics: {run_dir / 'metrics.csv'}"
                      f"   curve: {curve}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
