"""Shared fixtures: a tiny (identity at initialisation) restorer and small simulations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# OpenMP threads that spin while waiting made small torch ops 10-20x slower on this
# shared 2-core machine (measured); set before torch is imported, inherited by the CLI
# subprocesses the tests start
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# tests share the cores with each other: keep torch from oversubscribing them. Under
# pytest-xdist (`make test` runs one worker per core) each worker gets its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))
os.environ.setdefault("CRYOWAE_NO_TENSORBOARD", "1")


def _seconds(item) -> float:
    marker = item.get_closest_marker("slow")
    return float(marker.kwargs.get("seconds", 0.0)) if marker else 0.0


def pytest_collection_modifyitems(config, items) -> None:
    """Order the tests for the xdist workers (``--dist worksteal`` in the Makefile): the
    tests marked ``slow(seconds=...)`` first, longest first, so that none of them starts
    last and trails alone at the end; then the modules holding tests marked slow, each
    module's tests kept together and in order (module fixtures are built once), so the
    long tests overlap the many short ones; then the rest."""
    slow_modules = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (-_seconds(item), item.module not in slow_modules))


#: glibc settings of the memory tests: every allocation over 1 MiB is its own mapping,
#: returned at free, so RSS follows what is live; with transparent huge pages on those
#: mappings (hugetlb=1) the kernel faults them in 2 MiB pages instead of 4 KiB ones: the
#: sampling memory test took 135 s instead of 184 s (system time 41 s instead of 79 s)
#: and its growth read 2.4 MB instead of 2.7 MB
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def run_cli(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `python -m cryowae ARGS` and capture its output (text)."""
    proc = subprocess.run([sys.executable, "-m", "cryowae", *map(str, args)],
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"cryowae {' '.join(map(str, args))} failed "
                             f"({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def cancel_after(units: int):
    """A progress reporter that asks the running task to stop once `units` units (tiles,
    steps...) are done: how the tests interrupt long work to check resumption."""
    from cryowae.progress import ProgressReporter

    class _CancelAfter(ProgressReporter):
        def advance(self, n: int = 1, **info) -> None:
            super().advance(n, **info)
            if self.done >= units:
                self.cancel()

    return _CancelAfter()


def kill_when(args: list[str], ready, log: Path, cwd: Path | None = None,
              timeout: float = 300) -> int:
    """Start `args` in a new process group (output to the file `log`, not a pipe nobody
    drains), SIGKILL the whole group (the command and the workers it started) as soon as
    ``ready()`` is true, like a node losing power, and return the exit code."""
    import signal
    import time

    env = os.environ | {"OMP_NUM_THREADS": "1"}
    with open(log, "w") as sink:
        proc = subprocess.Popen(args, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if ready():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.02)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    return proc.returncode


class CliResult:
    """What an in-process `cryowae` call returned: exit code and captured text."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def invoke_cli(*args: str, check: bool = False) -> CliResult:
    """Run ``cryowae ARGS`` in this process through `cryowae.cli.main.main` (the real
    entry point, error mapping included) and capture stdout, stderr and the exit code.

    Much faster than `run_cli` (no new interpreter importing torch); use `run_cli` for
    the few tests that must see a real process (signals, environment, packaging)."""
    import contextlib
    import io

    from cryowae.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    res = CliResult(code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"cryowae {' '.join(map(str, args))} failed ({code}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def client():
    """A local Dask cluster of two worker processes with one thread each, shared by
    the tests of a module (restore-batch)."""
    from distributed import Client

    from cryowae.inference.cluster import local_cluster

    cluster = local_cluster(2)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def write_smooth_tomogram(folder: Path, shape=(24, 32, 32), seed=0) -> Path:
    """``folder/tomo.mrc`` at 10 A: Gaussian voxels (mean 3, std 2) averaged over 5^3
    boxes and scaled by 5, so it holds structure a few voxels wide to train and restore."""
    from cryowae.io import write_mrc

    v = np.random.default_rng(seed).normal(3.0, 2.0, size=shape).astype(np.float32)
    v = torch.nn.functional.avg_pool3d(torch.from_numpy(v)[None, None], 5, stride=1,
                                       padding=2)[0, 0].numpy() * 5
    path = folder / "tomo.mrc"
    write_mrc(path, v.astype(np.float32), 10.0)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """An untrained tiny restorer with the identity skip: its output head starts at zero,
    so it is the identity."""
    from cryowae.models.checkpoint import save_restorer
    from cryowae.models.restorer import RestorerConfig, WAERestorer
    from cryowae.training.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, 8, skip="identity"))
    model = WAERestorer(cfg.restorer)
    path = tmp_path_factory.mktemp("tiny_model") / "model.pt"
    save_restorer(path, model, cfg.to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(64, cfg.restorer.latent_dim))
    return path


@pytest.fixture(scope="session")
def small_sim(tmp_path_factory) -> Path:
    """A 32x48x48 simulated tomogram set (tomo, halves, gt, meta) at 10 A, seed 0."""
    out = tmp_path_factory.mktemp("sim") / "sim48"
    run_cli("simulate", out, "--size", "48", "--thickness", "32", "--voxel-size", "10",
            "--seed", "0", check=True)
    return out
