"""End to end on a CryoET Data Portal folder tree: two simulated tomograms laid out as
``{dataset}/{run}/Reconstructions/VoxelSpacing{spacing}/Tomograms/{id}/{run}.zarr``
(NGFF 0.4 written by ome-zarr, scale = voxel size in Angstrom; MRC twin, metadata),
the same file name ``TS_01.zarr`` in both runs, go through ``data verify``, ``train``,
``restore-batch``, ``sample`` and ``evaluate`` as a user runs them; the outputs are
checked with readers other than cryowae's own (``mrcfile.validate``, the ome-zarr
reader, the napari plugin's reader) and against each other."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml
import zarr

from .conftest import invoke_cli

pytestmark = pytest.mark.slow

VOXEL = 10.0
SPACING = f"VoxelSpacing{VOXEL:.3f}"
#: (dataset, run, tomogram id, simulation seed): the same run name in two datasets
RUNS = [("10001", "TS_01", "100", 1), ("10002", "TS_01", "200", 2)]
TILT = ("--tilt-min", "-60", "--tilt-max", "60")  # the simulation's range
TILES = ("--tile", "32", "--overlap", "8")
TRAIN = {"patch_size": 16, "channels": 4, "depth": 2, "latent_dim": 8, "batch_size": 2,
         "bank_size": 64, "log_every": 5, "checkpoint_every": 100, "lr": 5e-3,
         "check_prior_preference": False,
         "family": {"latent_channels": 4, "branch_channels": 4, "report_subtomograms": 8}}


def _portal_store(path: Path, data: np.ndarray) -> None:
    """A store as the Portal publishes it: NGFF 0.4 multiscales by ome-zarr (zarr format
    2, ``/`` chunk keys), axes z, y, x in angstrom, one scale per level."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscale

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    axes = [{"name": a, "type": "space", "unit": "angstrom"} for a in "zyx"]
    pyramid = [data, data[::2, ::2, ::2]]
    write_multiscale(pyramid, group, axes=axes, fmt=FormatV04(),
                     coordinate_transformations=[[{"type": "scale", "scale": [VOXEL] * 3}],
                                                 [{"type": "scale",
                                                   "scale": [2 * VOXEL] * 3}]],
                     storage_options={"chunks": (16, 16, 16), "chunk_key_encoding":
                                      {"name": "v2", "separator": "/"}})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def portal(tmp_path_factory) -> dict:
    """The tree (``root``), per run its store, MRC twin, tomogram folder and the
    simulation's ground truth; manifests of the MRC files."""
    d = tmp_path_factory.mktemp("portal")
    root = d / "portal"
    runs = []
    for dataset, run, tomo_id, seed in RUNS:
        sim = d / f"sim{seed}"
        invoke_cli("simulate", sim, "--size", "32", "--thickness", "32", "--voxel-size",
                   str(VOXEL), "--seed", str(seed), check=True)
        data = mrcfile.read(sim / "tomo.mrc").astype(np.float32)
        folder = root / dataset / run / "Reconstructions" / SPACING / "Tomograms" / tomo_id
        folder.mkdir(parents=True)
        _portal_store(folder / f"{run}.zarr", data)
        with mrcfile.new(folder / f"{run}.mrc") as mrc:
            mrc.set_data(data)
            mrc.voxel_size = VOXEL
        (folder / "tomogram_metadata.json").write_text(json.dumps(
            {"voxel_spacing": VOXEL, "omezarr_dir": f"{run}.zarr"}))
        (root / dataset / run / "run_metadata.json").write_text("{}")
        runs.append({"dataset": dataset, "run": run, "id": tomo_id, "folder": folder,
                     "store": folder / f"{run}.zarr", "mrc": folder / f"{run}.mrc",
                     "gt": sim / "gt.mrc", "data": data})
    return {"dir": d, "root": root, "runs": runs}


def _entry(r: dict, name: str) -> dict:
    return {"name": name, "source": {"type": "cryoet-data-portal",
                                     "dataset_id": int(r["dataset"]), "run_name": r["run"],
                                     "tomogram_id": int(r["id"])},
            "voxel_size_A": VOXEL, "tilt_min": -60, "tilt_max": 60,
            "file_name": r["mrc"].name, "size_bytes": r["mrc"].stat().st_size,
            "sha256": _sha256(r["mrc"]), "license": "CC0-1.0", "citation": "simulated"}


def _manifest(path: Path, entries: list[dict]) -> Path:
    path.write_text(yaml.safe_dump({"schema_version": 1, "entries": entries}))
    return path


def test_data_verify_each_portal_tomogram_folder(portal, tmp_path):
    """Each Tomograms/{id} folder against a manifest of its MRC file: ok; the whole tree
    against one manifest of both runs (the same file name in each): each entry found in
    the Portal layout; one changed byte: exit 1, named."""
    for k, r in enumerate(portal["runs"]):
        m = _manifest(tmp_path / f"m{k}.yaml", [_entry(r, f"run{k}")])
        res = invoke_cli("data", "verify", m, r["folder"])
        assert res.returncode == 0, res.stdout + res.stderr
        assert "1 ok, 0 failed" in res.stdout
    both = _manifest(tmp_path / "both.yaml",
                     [_entry(r, f"{r['dataset']}-{r['run']}") for r in portal["runs"]])
    res = invoke_cli("data", "verify", both, portal["root"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 ok, 0 failed" in res.stdout
    # without a tomogram id the dataset tells the two copies apart
    r = portal["runs"][1]
    entry = _entry(r, "second")
    del entry["source"]["tomogram_id"]
    res = invoke_cli("data", "verify", _manifest(tmp_path / "no_id.yaml", [entry]),
                     portal["root"])
    assert res.returncode == 0 and "1 ok, 0 failed" in res.stdout, res.stdout + res.stderr
    # a repeated file name needs Portal places: one line, exit 2
    other = _entry(portal["runs"][0], "other") | {"source": {"type": "empiar",
                                                              "empiar_id": 10988,
                                                              "path": "a/TS_01.mrc"}}
    res = invoke_cli("data", "verify", _manifest(tmp_path / "clash.yaml",
                                                 [_entry(r, "second"), other]), tmp_path)
    assert res.returncode == 2 and "run_name and tomogram_id" in res.stderr
    bad = tmp_path / "copy"
    bad.mkdir()
    r = portal["runs"][0]
    raw = bytearray(r["mrc"].read_bytes())
    raw[-1] ^= 1
    (bad / r["mrc"].name).write_bytes(bytes(raw))
    res = invoke_cli("data", "verify", tmp_path / "m0.yaml", bad)
    assert res.returncode == 1 and "0 ok, 1 failed" in res.stdout


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64),
                             np.ravel(b).astype(np.float64))[0, 1])


def _ome_zarr_read(store: Path) -> tuple[list[np.ndarray], dict]:
    """Levels and metadata of a store as the ome-zarr reader sees it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(store)))())
    return [np.asarray(level) for level in nodes[0].data], nodes[0].metadata


def _spatial_scale(meta: dict) -> list[float]:
    [[scale]] = [[t["scale"] for t in ct if t["type"] == "scale"]
                 for ct in meta["coordinateTransformations"][:1]]
    return [float(s) for s in scale[-3:]]


def test_portal_tree_train_restore_batch_sample_evaluate(portal, tmp_path):
    from cryowae.plugins._reader import napari_get_reader

    runs, root = portal["runs"], portal["root"]
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"train": TRAIN}))

    # train on both Portal stores
    run_dir = tmp_path / "run"
    invoke_cli("train", *(r["store"] for r in runs), "--out", run_dir, "--config", cfg,
               "--steps", "12", "--seed", "5", "--device", "cpu", *TILT, check=True)
    assert (run_dir / "model.pt").is_file()

    # restore-batch on the two dataset folders: repeated names -> relative paths
    out = tmp_path / "restored"
    invoke_cli("restore-batch", *(root / r["dataset"] for r in runs), "--model", run_dir,
               "--out", out, "--workers", "1", "--block", "32", *TILES, "--levels", "2",
               "--mrc", check=True)
    restored = []
    for r in runs:
        name = r["store"].relative_to(root).with_suffix("")
        store, mrc = out / f"{name}.zarr", out / f"{name}.mrc"
        assert store.is_dir() and mrc.is_file(), sorted(p.name for p in out.rglob("*"))
        levels, meta = _ome_zarr_read(store)
        assert levels[0].shape == r["data"].shape and levels[0].dtype == np.float32
        assert len(levels) == 2 and levels[1].shape == tuple(s // 2 for s in r["data"].shape)
        assert _spatial_scale(meta) == pytest.approx([VOXEL] * 3)
        assert meta["name"] == r["run"]
        assert mrcfile.validate(str(mrc)) is True
        with mrcfile.open(mrc) as m:
            assert float(m.voxel_size.x) == pytest.approx(VOXEL)
            np.testing.assert_array_equal(m.data, levels[0])
        [(data, kw, kind)] = napari_get_reader(str(store))(str(store))
        assert kind == "image" and kw["scale"] == pytest.approx((VOXEL,) * 3)
        np.testing.assert_array_equal(np.asarray(data[0] if kw.get("multiscale") else data),
                                      levels[0])
        restored.append(levels[0])
    # each output is its own store's restoration: `restore` of that store alone gives it
    for k, r in enumerate(runs):
        single = tmp_path / f"single{k}.mrc"
        invoke_cli("restore", run_dir, r["store"], "-o", single, *TILES, "--device", "cpu",
                   check=True)
        one = mrcfile.read(single)
        gap = float(np.abs(one - restored[k]).max() / restored[k].std())
        print(f"run {k}: restore vs restore-batch max |difference| {gap:.2e} of the std; "
              f"the two runs' outputs differ by {np.abs(one - restored[1 - k]).max():.3g}")
        assert gap < 1e-4
        assert not np.allclose(one, restored[1 - k], rtol=0, atol=1e-2 * restored[k].std())
    gts = [mrcfile.read(r["gt"]).astype(np.float32) for r in runs]

    # a family of the second run's store
    fam = tmp_path / "family"
    invoke_cli("sample", run_dir, runs[1]["store"], "--n", "3", "--out", fam, *TILES,
               "--device", "cpu", "--seed", "0", *TILT, check=True)
    levels, meta = _ome_zarr_read(fam / "samples.zarr")
    samples = levels[0]
    assert samples.shape == (3, *runs[1]["data"].shape)
    assert _spatial_scale(meta) == pytest.approx([VOXEL] * 3)
    for f in ("mean.mrc", "std.mrc"):
        assert mrcfile.validate(str(fam / f)) is True
    # samples and std.mrc are float16 (mean and std come from the float32 samples): each
    # stored value is within 2^-11 of its own magnitude, so within 1e-3 of the largest
    samples = samples.astype(np.float64)
    tol = 1e-3 * float(np.abs(samples).max())
    np.testing.assert_allclose(mrcfile.read(fam / "mean.mrc"), samples.mean(axis=0),
                               rtol=0, atol=tol)
    np.testing.assert_allclose(mrcfile.read(fam / "std.mrc"), samples.std(axis=0),
                               rtol=0, atol=tol)
    assert float(samples.std(axis=0).mean()) > 0  # the samples differ
    layers = napari_get_reader(str(fam))(str(fam))
    kinds = {kw["metadata"]["cryowae"]["kind"] for _, kw, _ in layers}
    assert kinds == {"samples", "mean", "std"}

    # evaluate: the batch output against its truth; the family against its truth
    batch_name = runs[0]["store"].relative_to(root).with_suffix("")
    res = invoke_cli("evaluate", out / f"{batch_name}.zarr", "--gt", runs[0]["gt"], *TILT,
                     "--json", check=True)
    report = json.loads(res.stdout)
    print("evaluate:", {k: v for k, v in report.items() if not isinstance(v, dict | list)})
    assert report["pearson"] == pytest.approx(_pearson(restored[0], gts[0]), abs=1e-6)
    res = invoke_cli("evaluate", fam, "--gt", runs[1]["gt"], *TILT, "--json", check=True)
    family_report = json.loads(res.stdout)
    assert family_report  # a JSON object with the family's scores
    print("evaluate family:", sorted(family_report))
