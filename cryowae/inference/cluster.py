"""Dask clusters for `cryowae restore-batch`: a local one, or SLURM through dask-jobqueue.

`make_cluster("local")` starts a `distributed.LocalCluster` of worker processes with one
thread each: one worker per GPU on a GPU machine, one worker on a CPU-only machine.
`make_cluster("slurm", config)` starts a `dask_jobqueue.SLURMCluster` whose jobs are
described by a YAML file (see ``configs/cluster-slurm.yaml``, loaded by
`load_slurm_config`).

Every worker gets the resource ``BLOCK=1`` (block tasks ask for it, so a worker restores
one block at a time whatever its thread count) and the `DevicePlugin`, which picks the
worker's torch device once: ``cuda:i`` for the i-th worker of a machine or job with GPUs,
``cpu`` otherwise. Tasks read it with `worker_device`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cryowae.errors import CryowaeInputError

try:  # distributed is the optional "cluster" extra
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object  # type: ignore[assignment,misc]

#: the worker resource each block task needs one of
BLOCK_RESOURCE = "BLOCK"
#: keys a SLURM cluster config must set (``account`` and the rest are optional)
SLURM_REQUIRED = ("queue", "walltime", "cores", "memory", "gpus_per_job", "jobs")
SLURM_OPTIONAL = ("account", "processes", "python", "setup", "job_extra_directives",
                  "local_directory", "log_directory", "interface", "worker_lifetime",
                  "death_timeout", "job_name")
CLUSTER_KINDS = ("local", "slurm")

_DEVICE: str | None = None  # this worker process's device, set by DevicePlugin


@dataclass
class SlurmConfig:
    """What one SLURM job of the cluster looks like, and how many of them to run.

    Attributes
    ----------
    queue
        Partition (``#SBATCH -p``).
    walltime
        Time limit of each job, ``HH:MM:SS`` (``#SBATCH -t``).
    cores
        CPU cores per job (``--cpus-per-task``), shared by the job's workers.
    memory
        Memory per job, e.g. ``"64GB"`` (``--mem``), shared by the job's workers.
    gpus_per_job
        GPUs per job (``--gres=gpu:N``); 0 on a CPU partition.
    jobs
        Number of jobs kept running (each holds `processes` workers).
    account
        ``#SBATCH -A``, if the cluster bills an account.
    processes
        Workers per job; default one per GPU (or 1 without GPUs).
    python
        Python executable on the compute nodes; default the one running cryowae.
    setup
        Shell lines run before the worker starts (``module load ...``, ``source
        venv/bin/activate``...).
    job_extra_directives
        More ``#SBATCH`` options, e.g. ``["--constraint=a100"]``.
    local_directory, log_directory
        Node-local scratch for workers; folder for the jobs' stdout/stderr.
    interface
        Network interface the workers and the scheduler talk on (e.g. ``ib0``).
    worker_lifetime
        Retire each worker gracefully after this long (e.g. ``"230m"``, a little
        under `walltime`); jobs are then replaced, and no block is lost.
    death_timeout
        Seconds a worker waits for an unreachable scheduler before exiting.
    job_name
        SLURM job name (``#SBATCH -J``).
    """

    queue: str
    walltime: str
    cores: int
    memory: str
    gpus_per_job: int
    jobs: int
    account: str | None = None
    processes: int | None = None
    python: str | None = None
    setup: list[str] = field(default_factory=list)
    job_extra_directives: list[str] = field(default_factory=list)
    local_directory: str | None = None
    log_directory: str | None = None
    interface: str | None = None
    worker_lifetime: str | None = None
    death_timeout: float | None = 120
    job_name: str = "cryowae"

    @property
    def workers_per_job(self) -> int:
        return int(self.processes or max(1, self.gpus_per_job))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_slurm_config_path() -> Path:
    """The documented example shipped as ``cryowae/configs/cluster-slurm.yaml``."""
    return Path(str(resources.files("cryowae.configs") / "cluster-slurm.yaml"))


def load_slurm_config(path: str | os.PathLike | None = None) -> SlurmConfig:
    """Read and validate a SLURM cluster YAML (keys at the top or under ``slurm:``).

    `path` may also name a shipped preset (``cluster-slurm``). Raises
    `CryowaeInputError` naming every missing key, unknown key or bad value.
    """
    p = Path(path) if path is not None else default_slurm_config_path()
    if not p.exists() and path is not None and p.suffix == "" and not p.parent.name:
        cand = Path(str(resources.files("cryowae.configs") / f"{p.name}.yaml"))
        p = cand if cand.is_file() else p
    if not p.is_file():
        raise CryowaeInputError(f"--cluster-config {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CryowaeInputError(f"{p}: not valid YAML ({first})") from None
    if isinstance(data, dict) and isinstance(data.get("slurm"), dict):
        data = data["slurm"]
    if not isinstance(data, dict):
        raise CryowaeInputError(f"{p}: expected a mapping of SLURM settings (see "
                                "configs/cluster-slurm.yaml)")
    missing = [k for k in SLURM_REQUIRED if data.get(k) in (None, "")]
    if missing:
        raise CryowaeInputError(f"{p}: incomplete SLURM config, missing "
                                f"{', '.join(missing)} (see configs/cluster-slurm.yaml)")
    unknown = sorted(set(data) - set(SLURM_REQUIRED) - set(SLURM_OPTIONAL))
    if unknown:
        raise CryowaeInputError(f"{p}: unknown SLURM config key(s) {', '.join(unknown)}; "
                                f"known: {', '.join(SLURM_REQUIRED + SLURM_OPTIONAL)}")
    kw = {k: data[k] for k in SLURM_REQUIRED + SLURM_OPTIONAL if data.get(k) is not None}
    try:
        for k in ("cores", "gpus_per_job", "jobs", "processes"):
            if k in kw:
                kw[k] = int(kw[k])
        for k in ("queue", "walltime", "memory", "account", "python", "local_directory",
                  "log_directory", "interface", "worker_lifetime", "job_name"):
            if k in kw:
                kw[k] = str(kw[k])
        for k in ("setup", "job_extra_directives"):
            if k in kw:
                v = kw[k]
                kw[k] = [str(v)] if isinstance(v, str) else [str(x) for x in v]
        if "death_timeout" in kw:
            kw["death_timeout"] = float(kw["death_timeout"])
    except (TypeError, ValueError):
        raise CryowaeInputError(f"{p}: {k} has an invalid value {data[k]!r}") from None
    cfg = SlurmConfig(**kw)
    if cfg.cores < 1 or cfg.jobs < 1 or cfg.gpus_per_job < 0 or (cfg.processes or 1) < 1:
        raise CryowaeInputError(f"{p}: cores and jobs must be >= 1, gpus_per_job >= 0")
    if not re.fullmatch(r"(\d+-)?\d{1,3}(:\d\d){0,2}", cfg.walltime):
        raise CryowaeInputError(f"{p}: walltime {cfg.walltime!r} is not [D-]HH:MM:SS")
    return cfg


def count_gpus() -> int:
    """CUDA devices visible here (0 without torch CUDA support)."""
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken driver must not stop a CPU run
        return 0


def _worker_index(name: Any) -> int:
    """0, 1, ... for LocalCluster workers (named 0, 1, ...) and for the workers of one
    dask-jobqueue job (named ``<job>-0``, ``<job>-1``, ...)."""
    s = str(name)
    if s.isdigit():
        return int(s)
    m = re.search(r"-(\d+)$", s)
    return int(m.group(1)) if m else 0


class DevicePlugin(_WorkerPlugin):
    """A `distributed` worker plugin choosing the worker's torch device once.

    Worker ``i`` of a machine (or SLURM job) with ``n`` visible GPUs gets
    ``cuda:{i % n}``; without GPUs, ``cpu`` with ``OMP_NUM_THREADS`` torch threads when
    that is set, else `cpu_threads` (default: the worker's thread count). Registered
    with ``client.register_plugin(DevicePlugin())``.
    """

    idempotent = True
    name = "cryowae-device"

    def __init__(self, cpu_threads: int | None = None) -> None:
        self.cpu_threads = cpu_threads

    def setup(self, worker: Any) -> None:
        global _DEVICE
        import torch

        n = count_gpus()
        if n > 0:
            idx = _worker_index(worker.name) % n
            torch.cuda.set_device(idx)
            _DEVICE = f"cuda:{idx}"
        else:
            threads = self.cpu_threads or int(getattr(worker.state, "nthreads", 1) or 1)
            env = os.environ.get("OMP_NUM_THREADS", "")
            if env.strip().isdigit() and int(env) > 0:  # an explicit setting wins
                threads = int(env)
            torch.set_num_threads(max(1, int(threads)))
            _DEVICE = "cpu"

    def teardown(self, worker: Any) -> None:
        pass

    def transition(self, key: Any, start: str, finish: str, **kw: Any) -> None:
        pass


def worker_device() -> str:
    """The torch device of the worker process running the calling task (``cpu`` when
    the `DevicePlugin` was not registered)."""
    if _DEVICE is not None:
        return _DEVICE
    return "cpu"


def local_cluster(workers: int | None = None, threads_per_worker: int = 1,
                  memory_limit: str | float | None = "auto", dashboard: bool = False,
                  **kwargs: Any):
    """A `distributed.LocalCluster` of worker processes (one thread each by default).

    `workers` defaults to the number of GPUs, or 1 on a CPU-only machine.
    """
    from distributed import LocalCluster

    n = int(workers) if workers else max(1, count_gpus())
    if n < 1:
        raise CryowaeInputError(f"--workers must be >= 1, got {workers}")
    return LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=True,
                        memory_limit=memory_limit, resources={BLOCK_RESOURCE: 1},
                        dashboard_address=":0" if dashboard else None,
                        silence_logs=logging.ERROR, **kwargs)


def slurm_cluster_kwargs(config: SlurmConfig) -> dict[str, Any]:
    """Keyword arguments of `dask_jobqueue.SLURMCluster` for `config`."""
    directives = list(config.job_extra_directives)
    if config.gpus_per_job > 0:
        directives.insert(0, f"--gres=gpu:{config.gpus_per_job}")
    extra_args = ["--resources", f"{BLOCK_RESOURCE}=1"]
    if config.worker_lifetime:
        extra_args += ["--lifetime", config.worker_lifetime, "--lifetime-stagger", "2m"]
    kw: dict[str, Any] = dict(
        queue=config.queue, account=config.account, walltime=config.walltime,
        cores=config.cores, memory=config.memory, processes=config.workers_per_job,
        job_extra_directives=directives, job_script_prologue=list(config.setup),
        python=config.python or sys.executable, worker_extra_args=extra_args,
        job_name=config.job_name, death_timeout=config.death_timeout,
    )
    for k in ("local_directory", "log_directory", "interface"):
        if getattr(config, k):
            kw[k] = getattr(config, k)
    return kw


def slurm_cluster(config: SlurmConfig, workers: int | None = None):
    """A `dask_jobqueue.SLURMCluster` for `config`, asked to keep ``config.jobs`` jobs
    running (or enough for `workers` workers); jobs lost to the walltime are replaced."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise CryowaeInputError("--cluster slurm needs dask-jobqueue: pip install "
                                "'cryowae[cluster]'") from None
    jobs = config.jobs if not workers else math.ceil(workers / config.workers_per_job)
    cluster = SLURMCluster(**slurm_cluster_kwargs(config))
    try:
        check_job_script(cluster.job_script())
    except BaseException:
        cluster.close()
        raise
    cluster.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
    return cluster


def check_job_script(script: str, sbatch: str = "sbatch") -> None:
    """Ask SLURM whether it would accept the job (``sbatch --test-only``), so that a
    wrong partition, account or resource request stops the run with SLURM's own reason
    instead of leaving it waiting for workers that never come."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="cryowae-job-") as f:
        f.write(script)
        f.flush()
        try:
            proc = subprocess.run([sbatch, "--test-only", f.name], capture_output=True,
                                  text=True, timeout=120)
        except FileNotFoundError:
            raise CryowaeInputError(f"--cluster slurm: {sbatch} not found; run restore-batch "
                                    "where SLURM commands work (a login node)") from None
        except subprocess.TimeoutExpired:
            raise CryowaeInputError("--cluster slurm: sbatch --test-only did not answer in "
                                    "120 s; is the SLURM controller up?") from None
    if proc.returncode != 0:
        errors = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = errors[-1] if errors else f"exit code {proc.returncode}"
        raise CryowaeInputError(f"SLURM refuses the worker job described by --cluster-config: "
                                f"{why}")


def make_cluster(kind: str = "local", config: str | os.PathLike | SlurmConfig | None = None,
                 workers: int | None = None):
    """Start a cluster: ``local`` (`local_cluster`) or ``slurm`` (`slurm_cluster` with the
    YAML `config`, default ``configs/cluster-slurm.yaml``)."""
    if kind == "local":
        return local_cluster(workers)
    if kind == "slurm":
        cfg = config if isinstance(config, SlurmConfig) else load_slurm_config(config)
        return slurm_cluster(cfg, workers)
    raise CryowaeInputError(f"--cluster {kind!r}: choose one of {', '.join(CLUSTER_KINDS)}")


__all__ = [
    "BLOCK_RESOURCE", "CLUSTER_KINDS", "DevicePlugin", "SlurmConfig", "check_job_script",
    "count_gpus",
    "default_slurm_config_path", "load_slurm_config", "local_cluster", "make_cluster",
    "slurm_cluster", "slurm_cluster_kwargs", "worker_device",
]
