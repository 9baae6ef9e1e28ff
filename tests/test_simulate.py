"""The tomogram simulator: geometry, physics, determinism, outputs and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae import __version__
from cryowae.errors import CryowaeInputError
from cryowae.io import read_mrc, read_mrc_header, read_tilt_angles, write_tilt_angles
from cryowae.physics.ctf import CTFParams, apply_ctf, ctf_2d, interaction_constant, phase_flip
from cryowae.physics.wedge import wedge_mask
from cryowae.progress import Cancelled, ProgressReporter
from cryowae.simulation import (
    SimulationConfig,
    default_thickness,
    simulate_tomogram,
    write_simulation,
)
from cryowae.simulation.potential import (
    add_model_potential,
    guess_element,
    model_potential,
    read_atomic_model,
)
from cryowae.simulation.projection import project_y, tilt_weights, weighted_backprojection

from .conftest import invoke_cli

SMALL = dict(size=48, thickness=32, voxel_size=10.0)


def corr(a, b) -> float:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).flatten()
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def fourier_corr(a, b, mask: torch.Tensor) -> float:
    """Correlation of the rfft coefficients of a and b restricted to a boolean mask."""
    fa = torch.fft.rfftn(torch.as_tensor(np.asarray(a), dtype=torch.float64))[mask]
    fb = torch.fft.rfftn(torch.as_tensor(np.asarray(b), dtype=torch.float64))[mask]
    return float((fa * fb.conj()).sum().real / (fa.abs().pow(2).sum().sqrt()
                                                * fb.abs().pow(2).sum().sqrt()))


def blob(shape, center, sigma=2.5) -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float32) - n // 2 - c
            for n, c in zip(shape, center, strict=True)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.exp(-(z**2 + y**2 + x**2) / (2 * sigma**2))


# ------------------------------------------------------------------ projection geometry

def test_projection_geometry_matches_the_wedge_convention():
    shape = (32, 24, 48)
    vol = blob(shape, (8.0, 3.0, -10.0))
    angles = [-50.0, 0.0, 30.0]
    p = project_y(vol, angles)
    assert p.shape == (3, 24, 48)
    # zero tilt: exactly the sum along Z
    assert torch.allclose(p[1], vol.sum(0), atol=1e-4)
    for i, t in enumerate(angles):
        # every tilt keeps the integral, wherever the blob is
        assert float(p[i].sum()) == pytest.approx(float(vol.sum()), rel=2e-3)
        prof = p[i].sum(0).double()
        centroid = float((prof * torch.arange(48)).sum() / prof.sum()) - 24
        th = math.radians(t)
        assert centroid == pytest.approx(8.0 * math.sin(th) - 10.0 * math.cos(th), abs=0.05)


def test_projection_strength_does_not_depend_on_position():
    # the reason for the hand-written projector (cryowae.simulation.projection): a
    # projector with an interpolation correction gives off-centre blobs more mass; ours
    # must not
    shape = (48, 16, 128)
    for t in (0.0, 33.0):
        centre = project_y(blob(shape, (0.0, 0.0, 0.0)), [t]).sum()
        edge = project_y(blob(shape, (10.0, 0.0, 48.0)), [t]).sum()
        assert float(edge / centre) == pytest.approx(1.0, abs=2e-3)


def test_weighted_backprojection_inverts_a_dense_tilt_series():
    g = torch.Generator().manual_seed(0)
    shape = (24, 8, 48)
    vol = torch.randn(shape, generator=g)
    k = torch.fft.rfftfreq(48)
    low = torch.exp(-(k / 0.12) ** 2)  # smooth along x and z
    spec = torch.fft.rfftn(vol) * low[None, None, :]
    spec = spec * torch.exp(-(torch.fft.fftfreq(24) / 0.12) ** 2)[:, None, None]
    vol = torch.fft.irfftn(spec, s=shape)
    angles = torch.arange(-88.5, 90.0, 3.0)
    rec = weighted_backprojection(project_y(vol, angles), angles, shape)
    inner = (slice(4, 20), slice(None), slice(8, 40))
    assert corr(rec[inner], vol[inner]) > 0.99
    assert float(rec[inner].std() / vol[inner].std()) == pytest.approx(1.0, abs=0.05)


def test_tilt_weights():
    w = tilt_weights([-6.0, -3.0, 0.0, 3.0, 6.0])
    assert torch.allclose(w, torch.full((5,), math.radians(3.0), dtype=torch.float64))
    w = tilt_weights([0.0, -6.0, 6.0])  # unsorted, half the step at the ends
    assert torch.allclose(w, torch.full((3,), math.radians(6.0), dtype=torch.float64))


# ------------------------------------------------------------------ CTF

def test_ctf_convention_and_phase_flip():
    p = CTFParams(defocus=3.0, voltage=300.0, cs=2.7, amplitude_contrast=0.07)
    c = ctf_2d((64, 64), 8.0, p)
    assert c.shape == (64, 33)
    assert float(c[0, 0]) == pytest.approx(0.07, abs=1e-5)  # +A at zero frequency
    assert float(c.min()) < -0.9 and float(c.max()) > 0.9  # oscillates at 3 um, 8 A
    assert interaction_constant(300.0) == pytest.approx(6.53e-4, rel=2e-3)
    # phase flipping a CTF-filtered image leaves a non-negative transfer, |CTF|
    g = torch.Generator().manual_seed(1)
    img = torch.randn(64, 64, generator=g)
    out = phase_flip(apply_ctf(img, 8.0, p, pad=0), 8.0, p, pad=0)
    ratio = torch.fft.rfft2(out) / torch.fft.rfft2(img)
    assert float(ratio.real.min()) > -1e-3
    assert torch.allclose(ratio.real, c.abs(), atol=1e-3)


# ------------------------------------------------------------------ atomic models

PDB_NO_ELEMENTS = """\
ATOM      1  N   ILE A   1      10.000  10.000  10.000  1.00 20.00
ATOM      2  CA  ILE A   1      11.450  10.000  10.000  1.00 20.00
ATOM      3  C   ILE A   1      12.000  11.400  10.000  1.00 20.00
ATOM      4  O   ILE A   1      11.300  12.400  10.000  1.00 20.00
ATOM      5  CB  ILE A   1      12.000   9.200  11.200  1.00 20.00
ATOM      6  CG1 ILE A   1      11.500   7.800  11.200  1.00 20.00
ATOM      7  CD  ILE A   1      12.100   7.000  12.400  1.00 20.00
ATOM      8 1HB  ILE A   1      13.000   9.200  11.200  1.00 20.00
ATOM      9  SD  MET A   2      14.000  13.000  10.000  1.00 20.00
HETATM   10 CA    CA A 101      20.000  20.000  20.000  1.00 20.00
HETATM   11  O   HOH A 201      25.000  25.000  25.000  1.00 20.00
END
"""


def _write_protein(path: Path, n_res: int = 120) -> Path:
    """A compact synthetic 'protein' (a ball of residues) without element columns."""
    rng = np.random.default_rng(0)
    lines, k = [], 1
    names = [(" N  ", "ALA"), (" CA ", "ALA"), (" C  ", "ALA"), (" O  ", "ALA"),
             (" CB ", "ALA"), (" CD ", "ILE")]
    for r in range(1, n_res + 1):
        centre = rng.normal(size=3) * 9.0
        for name, res in names:
            x, y, z = centre + rng.normal(size=3) * 1.2
            lines.append(f"ATOM  {k:5d} {name} {res} A{r:4d}    {x:8.3f}{y:8.3f}{z:8.3f}"
                         "  1.00 30.00")
            k += 1
    path.write_text("\n".join(lines) + "\nEND\n")
    return path


def test_element_guessing_for_files_without_element_columns(tmp_path):
    assert guess_element(" CD ", "ILE") == "C"
    assert guess_element("CA", "CA") == "Ca"
    assert guess_element("1HB", "ILE") == "H"
    p = tmp_path / "noel.pdb"
    p.write_text(PDB_NO_ELEMENTS)
    m = read_atomic_model(p)
    assert m.n_atoms == 10  # the water is dropped
    assert m.atomic_numbers.tolist() == [7, 6, 6, 8, 6, 6, 6, 1, 16, 20]
    assert float(m.positions.mean(0).abs().max()) < 1e-4


def test_bad_atomic_model_files(tmp_path):
    with pytest.raises(CryowaeInputError, match="no such"):
        read_atomic_model(tmp_path / "missing.pdb")
    junk = tmp_path / "junk.pdb"
    junk.write_text("this is not a structure\n")
    with pytest.raises(CryowaeInputError, match=str(junk.name)):
        read_atomic_model(junk)


@pytest.mark.slow
def test_separable_potential_equals_the_library(tmp_path):
    m = read_atomic_model(_write_protein(tmp_path / "p.pdb", 30))
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(2)))[0]
    for vs in (8.0, 3.0):
        n = int(2 * m.radius / vs) + 6
        centre = torch.tensor([n / 2 * vs + 1.3, n / 2 * vs - 2.1, n / 2 * vs + 0.4])
        ref = model_potential(m, rot, centre, (0, 0, 0), (n, n, n), vs)
        vol = torch.zeros(n, n, n)
        add_model_potential(vol, m, rot, centre, vs)
        assert float((vol - ref).abs().max()) < 1e-4 * float(ref.max())


# ------------------------------------------------------------------ simulation

def test_default_thickness_and_shape():
    assert [default_thickness(s) for s in (128, 64, 48)] == [80, 40, 32]
    assert SimulationConfig().shape == (80, 128, 128)
    assert SimulationConfig(size=64, thickness=24).shape == (24, 64, 64)
    a = SimulationConfig(tilt_min=-54, tilt_max=66, tilt_step=3).tilt_angles()
    assert len(a) == 41 and a[0] == -54 and a[-1] == 66


def test_simulation_is_deterministic_per_seed():
    cfg = SimulationConfig(**SMALL, seed=3)
    a = simulate_tomogram(cfg)
    b = simulate_tomogram(cfg)
    c = simulate_tomogram(SimulationConfig(**SMALL, seed=4))
    for key in ("gt", "tomo", "tomo_even", "tomo_odd", "tilt_series", "angles"):
        assert a[key].dtype == torch.float32
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["gt"], c["gt"])
    assert not torch.equal(a["tomo"], c["tomo"])


def test_empty_planes_hold_no_object_and_their_noise_is_found():
    """With 12 empty planes at each Z face, the ground truth is nil there (the
    objects' potential tails aside: below 1e-3 of its peak) and the
    tomogram's empty-slab noise estimate finds them; without, the scene fills the slab
    (the one-voxel margin) and the estimate falls back to the ramp fit."""
    from cryowae.training.slab_noise import find_empty_slabs

    cfg = SimulationConfig(**{**SMALL, "thickness": 40}, seed=5, empty_planes=12)
    out = simulate_tomogram(cfg)
    gt = out["gt"]
    peak = float(gt.abs().max())
    assert peak > 0 and float(gt[12:-12].abs().max()) == peak
    assert float(gt[:12].abs().max()) < 1e-3 * peak and float(gt[-12:].abs().max()) < 1e-3 * peak
    found = find_empty_slabs(out["tomo"])
    assert not found.reason and sum(s.stop - s.start for s in found.slabs) >= 16
    full = simulate_tomogram(SimulationConfig(**{**SMALL, "thickness": 40}, seed=5))
    edge = max(float(full["gt"][1:4].abs().max()), float(full["gt"][-4:-1].abs().max()))
    assert edge > 0.1 * float(full["gt"].abs().max())
    with pytest.raises(CryowaeInputError, match="--empty-planes"):
        SimulationConfig(thickness=40, empty_planes=17).validate()


@pytest.mark.parametrize("axis", ["y", "x"])
def test_missing_wedge_orientation_with_an_asymmetric_range(axis):
    """Tilts -54..+66 must fill wedge_mask(-54, 66), not its mirror image (-66..54),
    about either tilt axis."""
    cfg = SimulationConfig(**SMALL, tilt_min=-54, tilt_max=66, tilt_axis=axis, noise=False,
                           ctf=False)
    tomo = simulate_tomogram(cfg)["tomo"]
    power = torch.fft.rfftn(tomo.double()).abs() ** 2
    m = wedge_mask(tomo.shape, -54, 66, axis, rfft=True).double()
    mirror = wedge_mask(tomo.shape, -66, 54, axis, rfft=True).double()
    frac = float((power * m).sum() / power.sum())
    frac_mirror = float((power * mirror).sum() / power.sum())
    only = float((power * m * (1 - mirror)).sum() / power.sum())
    only_mirror = float((power * mirror * (1 - m)).sum() / power.sum())
    # measured: 0.961 vs 0.904; the 12-degree strips only one of them has: 0.077 vs 0.020
    assert frac > 0.95 and frac - frac_mirror > 0.04
    assert only > 3 * only_mirror


@pytest.mark.slow  # the small_sim fixture runs `cryowae simulate` in a subprocess
def test_simulation_outputs_and_meta(small_sim):
    names = {p.name for p in small_sim.iterdir()}
    assert {"tomo.mrc", "tomo_even.mrc", "tomo_odd.mrc", "gt.mrc", "meta.json",
            "tilts.tlt", "tilt_series.mrc"} <= names
    assert not any(n.startswith(".") for n in names)
    for name in ("tomo", "tomo_even", "tomo_odd", "gt"):
        h = read_mrc_header(small_sim / f"{name}.mrc")
        assert h["shape"] == (32, 48, 48) and h["voxel_size"] == pytest.approx(10.0)
        assert h["mode"] == 2
    assert read_mrc_header(small_sim / "tilt_series.mrc")["shape"] == (41, 48, 48)
    meta = json.loads((small_sim / "meta.json").read_text())
    assert meta["cryowae_version"] == __version__ and meta["seed"] == 0
    cfg = meta["config"]
    assert (cfg["size"], cfg["thickness"], cfg["voxel_size"]) == (48, 32, 10.0)
    for key in ("tilt_min", "tilt_max", "tilt_step", "defocus", "voltage", "cs",
                "amplitude_contrast", "dose", "pdb"):
        assert key in cfg
    assert meta["shape_zyx"] == [32, 48, 48] and meta["voxel_size_A"] == 10.0
    angles = meta["tilt_angles_deg"]
    assert len(angles) == 41 and angles[0] == -60 and angles[-1] == 60
    np.testing.assert_allclose(read_tilt_angles(small_sim / "tilts.tlt"), angles)
    scene = meta["scene"]
    assert scene["n_particles"] == len(scene["particles"]) > 0
    assert sum(s["copies"] for s in scene["species"]) == scene["n_particles"]
    # 120 e/A^2 over 41 tilts of 10 A pixels
    assert meta["imaging"]["incident_electrons_per_pixel_per_tilt"] == pytest.approx(
        120 / 41 * 100)


@pytest.mark.slow  # the small_sim fixture runs `cryowae simulate` in a subprocess
def test_tomogram_resembles_the_ground_truth_only_where_measured(small_sim):
    gt = read_mrc(small_sim / "gt.mrc", mmap=False).data
    tomo = read_mrc(small_sim / "tomo.mrc", mmap=False).data
    even = read_mrc(small_sim / "tomo_even.mrc", mmap=False).data
    odd = read_mrc(small_sim / "tomo_odd.mrc", mmap=False).data
    assert gt.min() >= -1.0 and 2.0 < gt.max() < 3.5  # volts of contrast against ice
    # raw tomogram: noisy (measured 0.335 for this seed)
    r = corr(tomo, gt)
    assert 0.2 < r < 0.5
    measured = wedge_mask(gt.shape, -60, 60, rfft=True) > 0
    measured[0, 0, 0] = False  # the mean carries no structure
    missing = ~(wedge_mask(gt.shape, -60, 60, rfft=True) > 0)
    r_in, r_out = fourier_corr(tomo, gt, measured), fourier_corr(tomo, gt, missing)
    # measured: 0.396 in the measured region, 0.106 in the missing wedge (leakage from
    # the box edges only)
    assert r_in > 0.3 and r_out < 0.16 and r_in > 2.5 * r_out
    # halves: independent noise, same signal; their mean is the full reconstruction
    assert not np.array_equal(even, odd)
    assert 0.05 < corr(even, odd) < 0.25  # measured 0.126
    assert corr(0.5 * (even + odd), tomo) > 0.9999
    assert corr(even, gt) > 0.15 and corr(odd, gt) > 0.15


def test_noise_and_ctf_can_be_switched_off():
    clean = simulate_tomogram(SimulationConfig(**SMALL, noise=False, ctf=False))
    noisy = simulate_tomogram(SimulationConfig(**SMALL))
    r_clean = corr(clean["tomo"], clean["gt"])
    assert r_clean > 0.7 and r_clean > 2 * corr(noisy["tomo"], noisy["gt"])
    # without noise the halves differ only by their tilts
    assert corr(clean["tomo_even"], clean["tomo_odd"]) > 0.8


@pytest.mark.slow
def test_simulation_from_atomic_models(tmp_path):
    pdb = _write_protein(tmp_path / "ball.pdb")
    info: dict = {}
    res = simulate_tomogram(SimulationConfig(**SMALL, pdb=(str(pdb),), vesicle=False,
                                             filament=False), info=info)
    assert info["species"][0]["kind"] == "atomic" and info["n_particles"] > 5
    gt = res["gt"]
    # the solvent-corrected potential of the protein copies, and nothing else
    assert float(gt.min()) >= 0 and 1.0 < float(gt.max()) < 10.0


def test_progress_and_cancel():
    seen = []

    class Rec(ProgressReporter):
        def start(self, total, description="", done=0):
            super().start(total, description, done)
            seen.append((description, total))

    rec = Rec()
    simulate_tomogram(SimulationConfig(size=32, voxel_size=10.0), progress=rec)
    descs = [d for d, _ in seen]
    assert "projecting" in descs and "reconstructing" in descs

    class Cancel(ProgressReporter):
        def advance(self, n=1, **info):
            super().advance(n, **info)
            if self.description == "projecting":
                self.cancel()

    with pytest.raises(Cancelled, match="cancelled"):
        simulate_tomogram(SimulationConfig(size=32, voxel_size=10.0), progress=Cancel())


def test_write_is_atomic(tmp_path, monkeypatch):
    import cryowae.io as cio

    calls = []
    real = cio.write_mrc

    def failing(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(path, *a, **k)

    monkeypatch.setattr(cio, "write_mrc", failing)
    out = tmp_path / "sim"
    with pytest.raises(OSError, match="simulated"):
        write_simulation(out, SimulationConfig(size=32, voxel_size=10.0))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cfg, match", [
    (dict(tilt_min=70, tilt_max=60), "tilt range"),
    (dict(tilt_min=-95), "tilt range"),
    (dict(size=12), "--size"),
    (dict(voxel_size=0.0), "--voxel-size"),
    (dict(dose=-1.0), "--dose"),
    (dict(tilt_step=0.0), "--tilt-step"),
    (dict(amplitude_contrast=1.5), "--amplitude-contrast"),
    (dict(pdb=("/nonexistent/model.pdb",)), "--pdb"),
    (dict(tilt_axis="z"), "tilt axis"),
    (dict(angles=(-50.0, 0.0, 40.0)), "do not span"),
])
def test_config_validation(cfg, match):
    with pytest.raises(CryowaeInputError, match=match):
        SimulationConfig(**cfg).validate()


# ------------------------------------------------------------------ command line

@pytest.mark.parametrize("args, words", [
    (["--tilt-min", "70", "--tilt-max", "60"], "tilt range"),
    (["--size", "8"], "--size"),
    (["--voxel-size", "-4"], "--voxel-size"),
    (["--dose", "0"], "--dose"),
    (["--pdb", "missing.pdb"], "missing.pdb"),
    (["--tilt-axis", "z"], "tilt axis"),
    (["--tilt-file", "absent.tlt"], "absent.tlt"),
])
def test_cli_bad_input(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    proc = invoke_cli("simulate", out, *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_unreadable_pdb(tmp_path):
    junk = tmp_path / "junk.pdb"
    junk.write_text("garbage\n")
    out = tmp_path / "out"
    proc = invoke_cli("simulate", out, "--size", "32", "--pdb", junk)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "junk.pdb" in proc.stderr and not out.exists()


def test_cli_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "sim"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = invoke_cli("simulate", out, "--size", "32", "--voxel-size", "10")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--overwrite" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    proc = invoke_cli("simulate", out, "--size", "32", "--voxel-size", "10", "--seed", "1",
                      "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "tomo.mrc").is_file()
    assert str(out) in proc.stdout
    assert json.loads((out / "meta.json").read_text())["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["sim"]  # no temporary left behind


def test_cli_tilt_file_and_axis_then_evaluate(tmp_path):
    """`simulate --tilt-file --tilt-axis x` images exactly the file's angles about X and
    writes them to tilts.tlt; `evaluate` finds that file next to the tomogram."""
    angles = np.concatenate([np.arange(-48.0, 0.0, 6.0), np.arange(0.0, 67.0, 6.0)])
    tlt = tmp_path / "scheme.tlt"
    write_tilt_angles(tlt, angles[::-1])  # any order: the simulator sorts them
    out = tmp_path / "sim"
    proc = invoke_cli("simulate", out, "--size", "32", "--thickness", "32", "--voxel-size",
                      "10", "--tilt-file", tlt, "--tilt-axis", "X", "--no-noise", "--no-ctf")
    assert proc.returncode == 0, proc.stderr
    assert "-48..66 degrees about X" in proc.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tilt_axis"] == "x" and meta["config"]["tilt_axis"] == "x"
    np.testing.assert_allclose(meta["tilt_angles_deg"], angles)
    np.testing.assert_allclose(read_tilt_angles(out / "tilts.tlt"), angles)
    assert read_mrc_header(out / "tilt_series.mrc")["shape"] == (len(angles), 32, 32)
    tomo = read_mrc(out / "tomo.mrc", mmap=False).data
    power = torch.fft.rfftn(torch.from_numpy(tomo).double()).abs() ** 2
    about_x = wedge_mask(tomo.shape, -48, 66, "x", rfft=True).double()
    about_y = wedge_mask(tomo.shape, -48, 66, "y", rfft=True).double()
    frac_x = float((power * about_x).sum() / power.sum())
    frac_y = float((power * about_y).sum() / power.sum())
    assert frac_x > 0.95 and frac_x > frac_y + 0.05, (frac_x, frac_y)

    proc = invoke_cli("evaluate", out / "tomo.mrc", "--gt", out / "gt.mrc", "--tilt-axis",
                      "x", "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert (rep["tilt_min"], rep["tilt_max"], rep["tilt_axis"]) == (-48.0, 66.0, "x")
    assert rep["tilt_source"] == f"tilt file {out / 'tilts.tlt'}"
    assert rep["cc_measured"] > 0.7 and abs(rep["cc_wedge"]) < rep["cc_measured"] / 2
