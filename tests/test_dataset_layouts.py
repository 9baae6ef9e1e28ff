"""Dataset layouts: repeated file names, globs and list files, the CryoET Data Portal's
folders and voxel sizes, the NGFF name of written stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from cryowae.data.inputs import expand_inputs, output_names
from cryowae.errors import CryowaeInputError
from cryowae.io import read_volume, write_mrc, write_ome_zarr
from cryowae.io.portal import find_portal_tomograms, portal_tomogram

SHAPE = (16, 32, 32)
#: 1 x 2 x 2 = 4 blocks of 16 voxels per tomogram
BLOCKS = 4
KW = dict(block=16, tile=16, overlap=4, batch_size=4, levels=2)


def _ngff_name(store: Path) -> str:
    """The multiscale's name as the `ome-zarr` reader sees it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(store)))())
    return nodes[0].metadata["name"]


def _series(root: Path, n: int = 3, name: str = "tomo.mrc") -> list[Path]:
    """One folder per tilt series, the same file name in each (TS_01/tomo.mrc, ...)."""
    rng = np.random.default_rng(7)
    paths = []
    for i in range(1, n + 1):
        data = (rng.normal(size=SHAPE) + i).astype(np.float32)
        paths.append(write_mrc(root / f"TS_{i:02d}" / name, data, voxel_size=10.0))
    return paths


def _portal_zarr(path: Path, data: np.ndarray, scale: float | None) -> Path:
    """A store as the Portal writes it: NGFF 0.4 by ome-zarr, zarr format 2 with
    ``/``-separated chunk keys, axes z, y, x in angstrom, scale only (none: no
    transformation, to test the fallback)."""
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
    if scale is None:
        group.create_array("0", data=data, chunks=(8, 8, 8))
        group.attrs["multiscales"] = [{"version": "0.4", "axes": axes,
                                       "datasets": [{"path": "0"}]}]
        return path
    pyramid = [data, data[::2, ::2, ::2]]
    write_multiscale(pyramid, group, axes=axes,
                     coordinate_transformations=[[{"type": "scale", "scale": [scale] * 3}],
                                                 [{"type": "scale", "scale": [2 * scale] * 3}]],
                     storage_options={"chunks": (8, 8, 8), "chunk_key_encoding":
                                      {"name": "v2", "separator": "/"}})
    return path


def _portal_run(dataset: Path, run: str, spacing: str, scale: float | None,
                tomo_id: str = "100", meta_spacing: float | None = None) -> Path:
    """``{dataset}/{run}/Reconstructions/VoxelSpacing{spacing}/Tomograms/{id}/{run}.zarr``
    with its MRC twin, tomogram_metadata.json and an annotation store beside it."""
    vs_dir = dataset / run / "Reconstructions" / f"VoxelSpacing{spacing}"
    tdir = vs_dir / "Tomograms" / tomo_id
    tdir.mkdir(parents=True)
    data = np.random.default_rng(len(run)).normal(size=(16, 24, 24)).astype(np.float32)
    store = _portal_zarr(tdir / f"{run}.zarr", data, scale)
    write_mrc(tdir / f"{run}.mrc", data, voxel_size=float(spacing))
    (tdir / "tomogram_metadata.json").write_text(json.dumps(
        {"voxel_spacing": meta_spacing if meta_spacing is not None else float(spacing),
         "omezarr_dir": f"{run}.zarr"}))
    ann = vs_dir / "Annotations" / "101"
    ann.mkdir(parents=True)
    _portal_zarr(ann / "membrane-1.0_segmentationmask.zarr", data, float(spacing))
    (dataset / run / "run_metadata.json").write_text("{}")
    return store


# ----------------------------------------------------------------------------- naming

def test_output_names_flat_when_unique_else_relative(tmp_path):
    assert output_names([tmp_path / "a/x.mrc", tmp_path / "b/y.ome.zarr"]) == ["x", "y"]
    names = output_names([tmp_path / "d/TS_01/tomo.mrc", tmp_path / "d/TS_02/tomo.mrc",
                          tmp_path / "d/sub/TS_03/tomo.rec"])
    assert names == ["TS_01/tomo", "TS_02/tomo", "sub/TS_03/tomo"]
    # the same tomogram in two formats in one folder: one name, refused by the batch
    assert output_names([tmp_path / "t/tomo.mrc", tmp_path / "t/tomo.zarr"]) == ["tomo"] * 2


def test_globs_and_list_files(tmp_path):
    series = _series(tmp_path / "data")
    (tmp_path / "data" / "TS_02" / "notes.txt").write_text("not a list of tomograms")
    got = expand_inputs([str(tmp_path / "data" / "**" / "*.mrc")])
    assert got.paths == series and got.notes == []
    # a list file: paths relative to it, comments and blank lines skipped, globs allowed
    lst = tmp_path / "data" / "inputs.txt"
    lst.write_text("# three tilt series\nTS_03/tomo.mrc\n\n   TS_0[12]/tomo.mrc\n")
    assert expand_inputs([f"@{lst}"]).paths == [series[2], series[0], series[1]]
    assert expand_inputs([lst]).paths == [series[2], series[0], series[1]]
    # an input given twice counts once
    assert expand_inputs([series[0], f"@{lst}"]).paths == [series[0], series[2], series[1]]


@pytest.mark.parametrize("spec,needle", [
    ("missing.mrc", "missing.mrc: no such file or directory"),
    ("data/*/none.mrc", "the pattern matches no file"),
    ("@empty.txt", "the list names no inputs"),
    ("@absent.txt", "no such list file"),
    ("nested.txt", "a list file may not name another list"),
    ("data", "neither a Zarr store nor a CryoET Data Portal dataset or run"),
])
def test_input_specs_that_name_nothing_are_errors(tmp_path, monkeypatch, spec, needle):
    monkeypatch.chdir(tmp_path)
    _series(tmp_path / "data", n=1)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    (tmp_path / "nested.txt").write_text("@empty.txt\n")
    with pytest.raises(CryowaeInputError, match=needle):
        expand_inputs([spec])


def test_missing_input_is_one_line_exit_2(tiny_model_path, tmp_path):
    from tests.conftest import invoke_cli

    res = invoke_cli("restore-batch", str(tmp_path / "TS_*" / "tomo.mrc"), "--model",
                     tiny_model_path, "--out", tmp_path / "o")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "the pattern matches no file" in lines[0], lines


# ----------------------------------------------------------------------------- Portal

@pytest.mark.slow
def test_portal_dataset_folder_voxel_sizes_and_fallback(tmp_path):
    ds = tmp_path / "10000"
    a = _portal_run(ds, "TS_026", "13.480", 13.48)
    b = _portal_run(ds, "TS_027", "13.480", 10.0)  # NGFF disagrees with the folder
    c = _portal_run(ds, "TS_028", "7.840", None)  # no scale: the folder decides
    # an older run: {run}/Tomograms/VoxelSpacing{vs}/CanonicalTomogram/{run}.zarr
    old_dir = tmp_path / "old" / "TS_01" / "Tomograms" / "VoxelSpacing5.000" / "CanonicalTomogram"
    old_dir.mkdir(parents=True)
    d = _portal_zarr(old_dir / "TS_01.zarr", np.ones((8, 8, 8), np.float32), 5.0)

    assert find_portal_tomograms(ds) == [a, b, c]  # zarr over its MRC twin, no annotations
    assert portal_tomogram(a).run == "TS_026" and portal_tomogram(a).tomogram_id == "100"
    assert portal_tomogram(d).layout == "canonical" and portal_tomogram(d).voxel_spacing == 5.0

    got = expand_inputs([ds, ds / "TS_026", tmp_path / "old"])
    assert got.paths == [a, b, c, d]
    assert output_names(got.paths) == ["TS_026", "TS_027", "TS_028", "TS_01"]
    assert len(got.notes) == 2, got.notes
    assert got.notes[0].startswith(f"warning: {b}: voxel size 10 A from its metadata, but "
                                   "the folder name says 13.48 A and tomogram_metadata.json"
                                   " says 13.48 A; using 10 A")
    assert "no voxel size in its NGFF metadata; using 7.84 A" in got.notes[1]
    assert all("\n" not in n for n in got.notes)

    with read_volume(a) as vol:
        assert vol.voxel_size == pytest.approx(13.48) and vol.meta["voxel_source"] == "ngff"
        assert vol.shape == (16, 24, 24) and len(vol.meta["levels"]) == 2
    with read_volume(c) as vol:
        assert vol.voxel_size == pytest.approx(7.84) and vol.meta["voxel_source"] == "folder"
    # a 3-decimal rounding difference with the metadata json is no disagreement
    e = _portal_run(tmp_path / "r", "TS_9", "13.480", 13.4801, meta_spacing=13.4804)
    assert expand_inputs([e]).notes == []


# ----------------------------------------------------------------------------- NGFF name

def test_ngff_name_is_the_final_name(tmp_path):
    data = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    for name, expected in (("r.zarr", "r"), ("r2.ome.zarr", "r2")):
        out = write_ome_zarr(tmp_path / name, data, 10.0, levels=2)
        assert _ngff_name(out) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- batches

def _check_outputs(out: Path, series: list[Path]) -> None:
    """Identity model: every output equals its input; names keep the series folders."""
    for src in series:
        store = out / src.parent.name / "tomo.zarr"
        with read_volume(store) as vol, read_volume(src) as ref:
            np.testing.assert_allclose(vol.numpy(), ref.numpy(), rtol=0, atol=1e-5)
            assert vol.voxel_size == pytest.approx(10.0)
        assert _ngff_name(store) == "tomo"
        assert not (out / src.parent.name / "tomo.zarr.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == ["TS_01", "TS_02", "TS_03"]


@pytest.mark.slow
def test_repeated_names_plan_resumes_in_process(tiny_model_path, tmp_path):
    """The worker tasks in this process: the planner names the three outputs after their
    folders, a second plan finds the blocks the first run finished, the rest finishes.
    (A real `cryowae restore-batch` killed with SIGKILL and run again: test_restore_batch.)"""
    from cryowae.inference.batch import (
        BatchSettings,
        BlockTask,
        FinalizeTask,
        block_id,
        finalize_tomogram,
        plan_batch,
        restore_block,
    )
    from cryowae.inference.batch.resume import create_partial
    from cryowae.tiling import TileSettings

    series = _series(tmp_path / "data")
    out = tmp_path / "restored"
    settings = BatchSettings(model=str(tiny_model_path), tiles=TileSettings(16, 4, 4),
                             block=16, levels=2)

    def run(job, cores) -> None:
        for core in cores:
            restore_block(BlockTask(input=str(job.input), store=str(job.partial),
                                    shape=job.shape, core=core, bid=block_id(core, 16),
                                    model=str(tiny_model_path), tiles=settings.tiles,
                                    norm=job.norm))

    jobs = plan_batch(series, out, settings, 4)
    assert [j.name for j in jobs] == ["TS_01/tomo", "TS_02/tomo", "TS_03/tomo"]
    for job in jobs:  # the first run: half of each tomogram's blocks, then it stops
        job.norm = (0.0, 1.0)
        create_partial(job, settings)
        run(job, job.cores[:2])
    again = plan_batch(series, out, settings, 4)
    assert [len(j.done) for j in again] == [2, 2, 2]
    assert [j.state for j in again] == ["restore"] * 3 and again[0].norm == (0.0, 1.0)
    for job in again:
        run(job, [c for c in job.cores if block_id(c, 16) not in job.done])
        finalize_tomogram(FinalizeTask(
            partial=str(job.partial), final=str(job.final), shape=job.shape,
            voxel_size=job.voxel_size, origin=job.origin, levels=2, chunk=16,
            attrs=job.attrs(), mrc=None, mrc_meta={}))
    _check_outputs(out, series)
    assert [j.state for j in plan_batch(series, out, settings, 4)] == ["done"] * 3


# ----------------------------------------------------------------------------- train, sample

@pytest.mark.slow  # 3-9 s on one worker
def test_sample_several_repeated_names_one_family_each(tiny_model_path, tmp_path):
    from tests.conftest import invoke_cli

    series = _series(tmp_path / "data", n=2)
    fams = tmp_path / "fams"
    res = invoke_cli("sample", tiny_model_path, str(tmp_path / "data" / "TS_*" / "tomo.mrc"),
                     "--n", "2", "--sampler", "rotations", "--tile", "16", "--overlap", "4",
                     "--consistency", "none", "--tilt-min", "-60", "--tilt-max", "60",
                     "--out", fams, check=True)
    data = [read_volume(src).numpy() for src in series]
    for k, src in enumerate(series):
        fam = fams / src.parent.name / "tomo"
        meta = json.loads((fam / "family.json").read_text())
        assert meta["n_samples"] == 2 and f"{src}: 2 samples" in res.stdout
        # each family is its own tomogram's (identity restorer: rotations only blur it)
        mean = read_volume(fam / "mean.mrc").numpy().ravel()
        own = np.corrcoef(mean, data[k].ravel())[0, 1]
        other = np.corrcoef(mean, data[1 - k].ravel())[0, 1]
        assert own > 0.5 and abs(other) < 0.1, (own, other)
    bad = invoke_cli("sample", tiny_model_path, str(tmp_path / "data" / "TS_*" / "tomo.mrc"),
                     "--sampler", "rotations", "--even", series[0], "--odd", series[1],
                     "--out", tmp_path / "f2")
    assert bad.returncode == 2 and "--even/--odd belong to one tomogram" in bad.stderr


@pytest.mark.slow  # 4.1 s: two CLI training runs
def test_train_on_a_list_file(tmp_path):
    from tests.conftest import invoke_cli

    _series(tmp_path / "data", n=2)
    (tmp_path / "data" / "train.txt").write_text("# both series\nTS_01/tomo.mrc\nTS_02/tomo.mrc\n")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("train:\n  patch_size: 16\n  channels: 4\n  depth: 2\n  latent_dim: 8\n"
                   "  batch_size: 2\n  bank_size: 64\n  check_prior_preference: false\n"
                   "  family: false\n")
    res = invoke_cli("train", f"@{tmp_path / 'data' / 'train.txt'}", "--out", tmp_path / "run",
                     "--config", cfg, "--steps", "2", "--device", "cpu", "--tilt-min", "-60",
                     "--tilt-max", "60", check=True)
    assert "trained 2 steps" in res.stdout and (tmp_path / "run" / "model.pt").is_file()
    missing = invoke_cli("train", str(tmp_path / "nowhere" / "*.mrc"), "--out", tmp_path / "r2")
    assert missing.returncode == 2 and "the pattern matches no file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
