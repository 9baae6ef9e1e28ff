"""`cryowae simulate`: a crowded synthetic tomogram with its ground truth."""

from __future__ import annotations

from pathlib import Path

import typer


def simulate(
    out_dir: Path = typer.Argument(..., help="Output folder (created; must be empty or "
                                   "absent unless --overwrite).", show_default=False),
    size: int = typer.Option(128, "--size", help="Y and X in voxels."),
    thickness: int = typer.Option(None, "--thickness", help="Slab thickness Z in voxels "
                                  "[default: size * 5/8, a multiple of 8]."),
    empty_planes: int = typer.Option(0, "--empty-planes", help="Planes at each Z face "
                                     "left free of objects (ice and noise only), as in a "
                                     "reconstruction thicker than its specimen."),
    voxel_size: float = typer.Option(8.0, "--voxel-size", help="Angstrom per voxel."),
    tilt_min: float | None = typer.Option(None, "--tilt-min", help="Lowest tilt (degrees) "
                                          "[default: -60]."),
    tilt_max: float | None = typer.Option(None, "--tilt-max", help="Highest tilt (degrees) "
                                          "[default: 60]."),
    tilt_step: float = typer.Option(3.0, "--tilt-step", help="Tilt increment (degrees)."),
    tilt_axis: str = typer.Option("y", "--tilt-axis", help="Tilt axis: y or x."),
    tilt_file: Path | None = typer.Option(None, "--tilt-file", help="Simulate these tilt "
                                          "angles (.tlt/.rawtlt, one angle in degrees a "
                                          "line) instead of --tilt-min/--tilt-max/"
                                          "--tilt-step."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scene and the noise."),
    pdb: list[Path] = typer.Option(None, "--pdb", help="Atomic model (PDB/mmCIF) to use "
                                   "as a particle species (repeatable); default: "
                                   "procedural shapes."),
    defocus: float = typer.Option(3.0, "--defocus", help="Defocus in um (underfocus)."),
    voltage: float = typer.Option(300.0, "--voltage", help="Acceleration voltage (kV)."),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration (mm)."),
    amplitude_contrast: float = typer.Option(0.07, "--amplitude-contrast",
                                             help="Amplitude contrast fraction."),
    dose: float = typer.Option(120.0, "--dose", help="Total dose over the tilt series "
                               "(e/A^2)."),
    no_noise: bool = typer.Option(False, "--no-noise", help="No counting noise."),
    no_ctf: bool = typer.Option(False, "--no-ctf", help="Ideal transfer instead of a CTF."),
    pipeline: str = typer.Option("wbp", "--pipeline", help="Acquisition and "
                                 "reconstruction pipeline by name (wbp: the default "
                                 "simulator; fourier: direct Fourier insertion; ...); "
                                 "'--pipeline list' prints every name and what it does."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it "
                                   "exists."),
) -> None:
    """Simulate a tilt series of a crowded cell-like scene and reconstruct it: writes
    tomo.mrc, tomo_even.mrc, tomo_odd.mrc, gt.mrc, tilt_series.mrc, tilts.tlt and
    meta.json (with the pipeline's settings) to OUT_DIR."""
    from cryowae.cli.common import out_console
    from cryowae.cli.progress import RichProgress
    from cryowae.io import read_tilt_angles
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.simulation import SimulationConfig, check_output_dir, write_simulation
    from cryowae.simulation.pipelines import get_pipeline, pipeline_table

    if pipeline == "list":
        out_console.print(pipeline_table(), soft_wrap=True, highlight=False)
        return
    chosen = get_pipeline(pipeline)

    geometry = TiltGeometry.resolve(tilt_min=tilt_min, tilt_max=tilt_max,
                                    tilt_file=tilt_file, axis=tilt_axis)
    angles = read_tilt_angles(tilt_file) if tilt_file is not None else ()
    cfg = SimulationConfig.from_geometry(
        geometry, angles, size=size, thickness=thickness, empty_planes=empty_planes,
        voxel_size=voxel_size,
        tilt_step=tilt_step, seed=seed, pdb=tuple(str(p) for p in (pdb or [])),
        defocus=defocus, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
        dose=dose, noise=not no_noise, ctf=not no_ctf,
    )
    cfg.validate()
    check_output_dir(out_dir, overwrite)
    progress = RichProgress(transient=True)
    try:
        out = write_simulation(out_dir, cfg, overwrite=overwrite, progress=progress,
                               pipeline=chosen)
    finally:
        progress.finish()
    z, y, x = cfg.shape
    out_console.print(f"simulated {z}x{y}x{x} voxels at {voxel_size:g} A, "
                      f"{len(cfg.tilt_angles())} tilts {geometry.tilt_min:g}.."
                      f"{geometry.tilt_max:g} degrees about {geometry.axis.upper()}, "
                      f"pipeline {chosen.name}: {out}/ "
                      "(tomo.mrc, tomo_even.mrc, tomo_odd.mrc, gt.mrc, tilt_series.mrc, "
                      "tilts.tlt, meta.json)", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
