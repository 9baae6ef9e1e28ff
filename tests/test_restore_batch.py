"""`cryowae restore-batch`: blocked restoration on Dask (local cluster, real SLURM)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryowae.errors import CryowaeInputError
from cryowae.inference.batch import (
    DONE_DIR,
    BatchSettings,
    BlockTask,
    FinalizeTask,
    finalize_tomogram,
    plan_batch,
    restore_batch,
    restore_block,
)
from cryowae.inference.batch.resume import create_partial
from cryowae.inference.restore import restore_array
from cryowae.io import read_volume, write_mrc
from cryowae.models.checkpoint import load_restorer
from cryowae.tiling import TileSettings
from tests.conftest import invoke_cli, kill_when

SHAPE = (40, 70, 60)
#: small blocks and tiles keep the cluster busy for seconds, not minutes
KW = dict(block=32, tile=32, overlap=8, batch_size=4)
CLI_KW = ["--block", "32", "--tile", "32", "--overlap", "8"]
SLURM_SH = Path(__file__).with_name("slurm_local.sh")


@pytest.fixture(scope="module")
def tomos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("tomos")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        data = (rng.normal(size=SHAPE) * 2.0 + i).astype(np.float32)
        paths.append(write_mrc(d / f"tomo{i}.mrc", data, voxel_size=10.0, origin=(0, 0, 5.0)))
    return paths


@pytest.fixture(scope="module")
def real_model_path(tmp_path_factory) -> Path:
    """A tiny restorer that is NOT the identity: random output head and FiLM layers."""
    from cryowae.models.checkpoint import save_restorer
    from cryowae.models.restorer import RestorerConfig, WAERestorer
    from cryowae.training.config import TrainConfig

    torch.manual_seed(1)
    arch = dict(channels=4, depth=2, latent_dim=8)
    cfg = TrainConfig.from_dict({"patch_size": 16, **arch})
    model = WAERestorer(RestorerConfig(**arch))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.normal_(model.head.bias, std=0.1)
    for lin in model.film:
        torch.nn.init.normal_(lin.weight, std=0.3)
    path = tmp_path_factory.mktemp("real_model") / "model.pt"
    save_restorer(path, model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(16, arch["latent_dim"]))
    return path


@pytest.fixture(scope="module")
def real_run(client, tomos, real_model_path, tmp_path_factory) -> Path:
    """An uninterrupted batch of tomo0 with the non-identity restorer (zarr + MRC)."""
    out = tmp_path_factory.mktemp("real_run")
    res = restore_batch([tomos[0]], real_model_path, out, client=client, mrc=True, **KW)
    assert res.blocks_run == res.blocks_total == 12 and not res.failed
    return out


def _level0(path: Path) -> np.ndarray:
    with read_volume(path) as vol:
        return vol.numpy()


@pytest.mark.slow  # 2.3 s: block tasks and a single pass
def test_block_tasks_equal_the_single_pass_without_a_cluster(real_model_path, tmp_path):
    """The worker tasks run in this process: every block, then the finishing task. With
    one tile per forward pass in both, the blocks equal `restore_array` bit for bit."""
    data = np.random.default_rng(5).normal(1.0, 2.0, size=(24, 40, 30)).astype(np.float32)
    src = write_mrc(tmp_path / "small.mrc", data, voxel_size=10.0)
    tiles = TileSettings(tile=16, overlap=4, batch_size=1)
    settings = BatchSettings(model=str(real_model_path), tiles=tiles, block=16, levels=1)
    restorer = load_restorer(real_model_path)
    [job] = plan_batch([src], tmp_path / "out", settings, restorer.model.multiple)
    job.norm = (float(data.mean()), float(data.std()))
    create_partial(job, settings)
    for core in job.cores:
        bid = f"b{len(os.listdir(job.partial / DONE_DIR))}"
        restore_block(BlockTask(input=str(job.input), store=str(job.partial), shape=job.shape,
                                core=core, bid=bid, model=str(real_model_path), tiles=tiles,
                                norm=job.norm))
    assert len(os.listdir(job.partial / DONE_DIR)) == job.n_blocks == 12
    finalize_tomogram(FinalizeTask(
        partial=str(job.partial), final=str(job.final), shape=job.shape,
        voxel_size=job.voxel_size, origin=job.origin, levels=1, chunk=settings.out_chunk,
        attrs=job.attrs(), mrc=None, mrc_meta={}))
    ref = restore_array(restorer, data, tile=16, overlap=4, batch_size=1, norm=job.norm)
    assert np.abs(ref - data).max() > 0.5  # the restorer does change the data
    np.testing.assert_array_equal(_level0(job.final), ref)
    assert not job.partial.exists() and not (job.final / DONE_DIR).exists()


@pytest.mark.slow
def test_identity_model_restores_three_tomograms(client, tomos, tiny_model_path, tmp_path):
    kw = KW | {"block": 64, "chunk": 32}  # 2 blocks of 2x2x2 chunks (or fewer) per tomogram
    res = restore_batch(tomos, tiny_model_path, tmp_path, client=client, **kw)
    assert not res.failed and res.blocks_total == 6 and res.blocks_run == 6
    for t in tomos:
        with read_volume(tmp_path / f"{t.stem}.zarr") as vol:
            np.testing.assert_allclose(vol.numpy(), _level0(t), rtol=0, atol=1e-5)
            assert vol.voxel_size == pytest.approx(10.0) and vol.origin == (0.0, 0.0, 5.0)
            assert [a.shape for a in vol.meta["levels"]] == [SHAPE, (20, 35, 30),
                                                             (10, 17, 15)]
            assert vol.meta["levels"][0].chunks == (32, 32, 32)
        assert not (tmp_path / f"{t.stem}.zarr.partial").exists()
        assert not (tmp_path / f"{t.stem}.zarr" / DONE_DIR).exists()

    # a rerun keeps finished outputs; other settings are refused without --overwrite
    again = restore_batch(tomos, tiny_model_path, tmp_path, client=client, **kw)
    assert again.blocks_run == 0 and again.blocks_already_done == 6
    assert len(again.skipped) == 3
    with pytest.raises(CryowaeInputError, match="--overwrite"):
        restore_batch(tomos[:1], tiny_model_path, tmp_path, client=client,
                      **(kw | {"overlap": 12}))


@pytest.mark.slow
def test_overwrite_replaces_finished_output(client, tiny_model_path, tmp_path):
    src = write_mrc(tmp_path / "small.mrc", np.random.default_rng(3).normal(
        size=(12, 20, 16)).astype(np.float32), voxel_size=8.0)
    out = tmp_path / "out"
    kw = dict(block=16, tile=16, overlap=4, levels=1)
    restore_batch([src], tiny_model_path, out, client=client, **kw)
    res = restore_batch([src], tiny_model_path, out, client=client, overwrite=True,
                        window="gaussian", **kw)
    assert res.blocks_run == res.blocks_total == 2 and not res.skipped
    with read_volume(out / "small.zarr") as vol:
        attrs = vol.meta["attrs"]["cryowae_batch"]
    assert attrs["settings"]["window"] == "gaussian"
    np.testing.assert_allclose(_level0(out / "small.zarr"), _level0(src), atol=1e-5)


@pytest.mark.slow
def test_blocks_match_single_pass(real_run, tomos, real_model_path):
    data = _level0(tomos[0])
    ref = restore_array(load_restorer(real_model_path), data, tile=32, overlap=8)
    assert np.abs(ref - data).max() > 0.5  # the restorer does change the data
    got = _level0(real_run / "tomo0.zarr")
    # batches of other tiles may round differently: float rounding only
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    np.testing.assert_array_equal(_level0(real_run / "tomo0.mrc"), got)


def _blocks_line(stdout: str) -> tuple[int, int, int]:
    m = re.search(r"blocks: (\d+) total, (\d+) restored in this run, (\d+) already done",
                  stdout)
    assert m, stdout
    return int(m[1]), int(m[2]), int(m[3])


@pytest.mark.slow
def test_killed_run_resumes_with_only_missing_blocks(client, real_run, tomos,
                                                     real_model_path, tmp_path):
    """SIGKILL a real `cryowae restore-batch` and its worker (its process group) once
    some blocks are done, like a node losing power; a rerun does only the missing
    blocks and gives the uninterrupted run's output."""
    out = tmp_path / "out"
    partial = out / "tomo0.zarr.partial"
    log = tmp_path / "killed.log"

    def some_block_done() -> bool:
        d = partial / DONE_DIR
        return d.is_dir() and len(os.listdir(d)) >= 1

    code = kill_when([sys.executable, "-m", "cryowae", "restore-batch", str(tomos[0]),
                      "--model", str(real_model_path), "--out", str(out), "--workers", "1",
                      *CLI_KW], some_block_done, log)
    assert code == -signal.SIGKILL, log.read_text()[-2000:]
    assert partial.is_dir() and not (out / "tomo0.zarr").exists()
    with pytest.raises(CryowaeInputError):  # a partial store is never mistaken for output
        read_volume(partial)
    done = len(os.listdir(partial / DONE_DIR))
    assert 1 <= done < 12

    res = restore_batch([tomos[0]], real_model_path, out, client=client, **KW)
    assert (res.blocks_total, res.blocks_run, res.blocks_already_done) == (12, 12 - done, done)
    assert not partial.exists() and not res.failed
    # same blocks, same arithmetic (one torch thread per worker here and in real_run)
    np.testing.assert_array_equal(_level0(out / "tomo0.zarr"), _level0(real_run / "tomo0.zarr"))


def test_incomplete_slurm_config_is_one_line_exit_2(tmp_path, tiny_model_path):
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("slurm:\n  cores: 4\n  memory: 16GB\n  gpus_per_job: 1\n  jobs: 2\n")
    res = invoke_cli("restore-batch", tmp_path / "t.mrc", "--model", tiny_model_path,
                     "--out", tmp_path / "o", "--cluster", "slurm", "--cluster-config", cfg)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing queue, walltime" in lines[0], lines


@pytest.mark.parametrize("args,needle", [
    (["--overlap", "40"], "--overlap 40 must be smaller than the tile (32)"),
    (["--overlap", "8", "--block", "48", "--chunk", "32"],
     "--block 48 must be a multiple of the output chunk"),
])
def test_bad_batch_options_are_one_line_exit_2(tomos, tiny_model_path, tmp_path, args,
                                               needle):
    res = invoke_cli("restore-batch", tomos[0], "--model", tiny_model_path, "--out",
                     tmp_path / "o", "--tile", "32", *args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_slurm_job_script_from_config(tmp_path):
    from cryowae.inference.cluster import load_slurm_config, slurm_cluster_kwargs

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(
        "slurm:\n  queue: gpu\n  account: lab42\n  walltime: '02:00:00'\n  cores: 8\n"
        "  memory: 64GB\n  gpus_per_job: 2\n  jobs: 3\n  python: /opt/py/bin/python\n"
        "  setup: ['module load cuda/12.4']\n")
    cfg = load_slurm_config(cfg_path)
    assert cfg.workers_per_job == 2
    from dask_jobqueue import SLURMCluster

    kw = slurm_cluster_kwargs(cfg) | {"scheduler_options": {"dashboard_address": ":0"}}
    with SLURMCluster(**kw) as cluster:
        script = cluster.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A lab42", "#SBATCH -t 02:00:00",
                 "#SBATCH --gres=gpu:2", "#SBATCH --mem=60G", "#SBATCH --cpus-per-task=8",
                 "module load cuda/12.4", "/opt/py/bin/python -m distributed.cli.dask_worker",
                 "--nworkers 2", "--resources BLOCK=1"):
        assert line in script, (line, script)
    # the shipped example is complete
    load_slurm_config(Path(__file__).parents[1] / "configs" / "cluster-slurm.yaml")


# --------------------------------------------------------------------------- real SLURM

@pytest.fixture(scope="module")
def slurm_conf(tmp_path_factory):
    """A one-node SLURM started with tests/slurm_local.sh (skips if it cannot run here)."""
    import socket

    d = tmp_path_factory.mktemp("slurm")
    ports = []
    for _ in range(2):  # free ports, so a concurrent or stale test cluster is no obstacle
        with socket.socket() as sock:
            sock.bind(("", 0))
            ports.append(str(sock.getsockname()[1]))
    env = os.environ | {"CRYOWAE_SLURMCTLD_PORT": ports[0], "CRYOWAE_SLURMD_PORT": ports[1]}
    proc = subprocess.run(["bash", str(SLURM_SH), "start", str(d)], capture_output=True,
                          text=True, timeout=120, env=env)
    if proc.returncode == 3:
        pytest.skip(f"no local SLURM: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    yield d / "slurm.conf"
    subprocess.run(["bash", str(SLURM_SH), "stop", str(d)], capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.slurm
def test_restore_batch_on_real_slurm(slurm_conf, tomos, tiny_model_path, tmp_path):
    logs = tmp_path / "logs"
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(
        "slurm:\n  queue: cryowae_test\n  walltime: '00:10:00'\n  cores: 1\n"
        f"  memory: 2GB\n  gpus_per_job: 0\n  jobs: 1\n  python: {sys.executable}\n"
        f"  log_directory: {logs}\n  death_timeout: 60\n")
    env = os.environ | {"SLURM_CONF": str(slurm_conf), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "cryowae", "restore-batch", str(tomos[1]), "--model",
         str(tiny_model_path), "--out", str(out), "--cluster", "slurm", "--cluster-config",
         str(cfg), *CLI_KW, "--block", "64", "--chunk", "32"], capture_output=True,
        text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _blocks_line(proc.stdout) == (2, 2, 0)
    np.testing.assert_allclose(_level0(out / "tomo1.zarr"), read_volume(tomos[1]).numpy(),
                               atol=1e-5)
    # the blocks ran in SLURM jobs: the controller allocated them, their workers logged
    ctl_log = (slurm_conf.parent / "log" / "slurmctld.log").read_text()
    assert "sched: Allocate JobId=" in ctl_log
    assert any("Starting Worker" in p.read_text() for p in logs.glob("*.err"))
