"""One prepared device check: CUDA tests, training and restore throughput, network
TFLOP/s, a 16-sample family; one JSON file and one table, GPU and CPU rows together.

    benchmarks/gpu_check.sh                  # on a GPU machine (under 8 minutes)
    benchmarks/gpu_check.sh --cpu            # the CPU rows, at small sizes

Without a CUDA GPU (and without ``--cpu``) it says so in one line and exits 0. Rows are
merged into ``--out`` (default gpu_check.json): a row replaces the earlier row of the
same device, measure and setting, so CPU rows measured on one machine and GPU rows on
another print as one table. The JSON is rewritten after every row, so a run that is cut
short keeps what it measured.

Measures (each row: device, measure, setting, value, unit, notes):

- ``cuda tests``: ``pytest -m cuda`` (tests/test_gpu_paths.py: training steps, restore
  against the CPU, bf16 against fp32, pinned prefetching, batch size from free memory,
  torch.compile, DDP with NCCL on the GPUs present); GPU only.
- ``train``: subtomograms/s of `Trainer.train_step` at the device's preset
  (`cryowae.devices.preset_for`; gpu-default: fp32 and bf16) on a synthetic tomogram,
  after warm-up steps; peak GPU memory.
- ``restore``: `restore_file` (memory-mapped MRC in and out, batch size from free GPU
  memory, prefetching engine) of a random-noise tomogram with the benchmark restorer of
  benchmarks/bench_restore.py, in a fresh process: output Mvoxel/s of the whole call
  (statistics and NaN scan included), peak RSS and peak GPU memory; on the GPU also
  fp32 and channels_last_3d at the first size.
- ``conv TFLOP/s``: the network's FLOPs per tile (torch.utils.flop_counter) times the
  tiles of the first restore size over its seconds, and the fraction of the GPU's bf16
  dense peak (`PEAK_BF16_TFLOPS`, or ``--peak-tflops``).
- ``conv3d TFLOP/s`` (CPU): a 3x3x3 12 -> 12 convolution in float32 and in bf16
  autocast against the cores' float32 and bf16 peaks (threads x GHz x FLOPs per cycle,
  benchmarks/cpu_peak.py); with bf16 instructions also ``restore`` in bf16.
- ``family``: `cryowae.sampling.sample_file` of 16 samples (benchmarks/bench_sampling.py
  ``bench_family``, random stochastic restorer): seconds, peak RSS, peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_restore import bench_model, parse_size  # noqa: E402
from bench_sampling import _peak_rss, bench_family  # noqa: E402
from cpu_peak import conv_rate, this_cpu  # noqa: E402

from cryowae import precision  # noqa: E402

#: dense BF16 tensor-core peak (TFLOP/s) by GPU name, from NVIDIA's data sheets; a name
#: not listed gives no fraction unless --peak-tflops is passed
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0}

GPU_SIZES = ((256, 512, 512), (512, 1024, 1024))
CPU_SIZES = ((48, 96, 96),)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def peak_tflops(name: str, given: float | None) -> float | None:
    if given:
        return given
    for key, value in PEAK_BF16_TFLOPS.items():  # longest names first in the table
        if key in name:
            return value
    return None


class Rows:
    """The rows of the JSON file, merged by (device, measure, setting)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = (json.loads(path.read_text())["rows"]
                                           if path.exists() else [])

    def add(self, **row: Any) -> None:
        key = (row["device"], row["measure"], row["setting"])
        self.rows = [r for r in self.rows
                     if (r["device"], r["measure"], r["setting"]) != key] + [row]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rows": self.rows}, indent=1, default=float))
        tmp.replace(self.path)
        print(f"  {row['device']} | {row['measure']} | {row['setting']} | "
              f"{_fmt(row['value'])} {row['unit']}", flush=True)

    def table(self) -> str:
        lines = ["| device | measure | setting | value | unit | notes |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['device']} | {r['measure']} | {r['setting']} | "
                         f"{_fmt(r['value'])} | {r['unit']} | {r.get('notes', '')} |")
        return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _gib(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def _cuda_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


# ----------------------------------------------------------------------------- parts
def cuda_tests(rows: Rows, label: str) -> None:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider", str(HERE.parent / "tests")],
                          capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    rows.add(device=label, measure="cuda tests", setting="pytest -m cuda",
             value="passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})",
             unit="", notes=f"{summary}; {time.perf_counter() - t0:.0f} s")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")


def synthetic_tomogram(path: Path, shape: tuple[int, int, int], smooth: bool) -> Path:
    """Random noise (low-passed when `smooth`, for training), float32 MRC, slab by slab."""
    from cryowae.io import open_mrc_writer

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    with open_mrc_writer(path, shape, 10.0) as out:
        for z in range(0, shape[0], 32):
            n = min(32, shape[0] - z)
            slab = rng.standard_normal((n, *shape[1:]), dtype=np.float32)
            if smooth:
                t = torch.from_numpy(slab)[None, None]
                slab = (5 * torch.nn.functional.avg_pool3d(t, 5, 1, 2))[0, 0].numpy()
            out[z:z + n] = slab
    return path


def train_speed(rows: Rows, label: str, device: torch.device, work: Path, steps: int,
                amp: bool) -> None:
    from cryowae.devices import preset_for
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    preset = preset_for(device)
    cfg = load_config(preset).replace(device=str(device), amp=amp, steps=10**6,
                                      check_prior_preference=False)
    p = cfg.patch_size
    shape = (max(64, p + 16), 2 * p + 32, 2 * p + 32)
    tomo = synthetic_tomogram(work / f"train_{'x'.join(map(str, shape))}.mrc", shape, True)
    tr = Trainer(load_sources([tomo], [], [], min_size=p), cfg, work / f"run_{preset}_{amp}")
    for _ in range(3):  # warm-up (cudnn autotuning, allocator)
        tr.train_step()
    _cuda_peak_reset(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tr.train_step()
    peak = _cuda_peak(device)
    dt = time.perf_counter() - t0
    prec = "bf16" if amp and device.type == "cuda" else "fp32"
    rows.add(device=label, measure="train", setting=f"{preset}, {prec}",
             value=steps * cfg.batch_size / dt, unit="subtomograms/s",
             notes=f"patch {p}, batch {cfg.batch_size}, family "
                   f"{'on' if cfg.family.enabled else 'off'}, {steps} steps after 3 warm-up"
                   + (f"; peak GPU {_gib(peak)}" if peak else ""))


def restore_child(args: argparse.Namespace) -> None:
    """One restore_file in this fresh process; prints a JSON line."""
    from cryowae.inference.restore import restore_file
    from cryowae.precision import ComputeSettings

    device = torch.device(args.device)
    # the device's default (bf16 on CUDA, float32 on a CPU), or as asked
    amp = False if args.fp32 else (True if args.bf16 else None)
    compute = ComputeSettings(amp=amp, channels_last=args.channels_last)
    base = _peak_rss()
    _cuda_peak_reset(device)
    msgs: list[str] = []

    from cryowae.progress import ProgressReporter

    class Log(ProgressReporter):
        def log(self, message: str) -> None:
            msgs.append(message)

    t0 = time.perf_counter()
    restore_file(args.model, args.input, args.output, tile=args.tile, overlap=args.overlap,
                 batch_size=None, device=args.device, overwrite=True, compute=compute,
                 progress=Log())
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": _peak_rss(),
                      "gpu_peak": _cuda_peak(device), "log": msgs}))


def restore_speed(rows: Rows, label: str, device: torch.device, work: Path,
                  shape: tuple[int, int, int], tile: int, overlap: int,
                  variant: str = "") -> dict[str, Any] | None:
    model = bench_model(work / "bench_model.pt")
    src = synthetic_tomogram(work / f"noise_{'x'.join(map(str, shape))}.mrc", shape, False)
    out = work / "restored.mrc"
    cmd = [sys.executable, __file__, "--restore-child", "--model", str(model), "--input",
           str(src), "--output", str(out), "--device", str(device), "--tile", str(tile),
           "--overlap", str(overlap)]
    cmd += {"fp32": ["--fp32"], "bf16": ["--bf16"],
            "channels_last": ["--channels-last"]}.get(variant, [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out.unlink(missing_ok=True)
    setting = "x".join(map(str, shape)) + (f", {variant}" if variant else "")
    if proc.returncode != 0:
        rows.add(device=label, measure="restore", setting=setting, value="FAILED", unit="",
                 notes=proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else "")
        return None
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    batch = next((m.split()[2] for m in r["log"] if m.startswith("batch size")), "4")
    rows.add(device=label, measure="restore", setting=setting,
             value=math.prod(shape) / r["seconds"] / 1e6, unit="output Mvoxel/s",
             notes=f"{r['seconds']:.1f} s, tile {tile}/{overlap}, batch {batch}, peak RSS "
                   f"{_gib(r['peak_rss'])} (+{_gib(r['peak_rss'] - r['base_rss'])})"
                   + (f", peak GPU {_gib(r['gpu_peak'])}" if r["gpu_peak"] else ""))
    return r


def conv_tflops(rows: Rows, label: str, device: torch.device, work: Path,
                shape: tuple[int, int, int], tile: int, overlap: int, seconds: float,
                peak: float | None) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from cryowae.models.checkpoint import load_restorer
    from cryowae.tiling.settings import TileSettings

    r = load_restorer(bench_model(work / "bench_model.pt"), torch.device("cpu"))
    plan = TileSettings(tile, overlap).plan(shape, r.model.multiple)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        r.model(torch.zeros(1, 1, *plan.tile))
    flops = counter.get_total_flops() * plan.n_tiles
    achieved = flops / seconds / 1e12
    rows.add(device=label, measure="conv TFLOP/s", setting="x".join(map(str, shape)),
             value=achieved, unit="TFLOP/s",
             notes=f"{counter.get_total_flops() / 1e9:.1f} GFLOP per {plan.tile[0]}^3 tile x "
                   f"{plan.n_tiles} tiles over the whole restore's {seconds:.1f} s"
                   + (f"; {100 * achieved / peak:.1f}% of {peak:g} TFLOP/s bf16 peak"
                      if peak else ""))


def cpu_conv_rows(rows: Rows, label: str, fp32_per_cycle: int | None) -> None:
    """Achieved TFLOP/s of a 3x3x3 12 -> 12 convolution (cpu-small's first level) in
    float32 and in bf16 autocast, against the cores' peaks (benchmarks/cpu_peak.py)."""
    peak = this_cpu(fp32_per_cycle=fp32_per_cycle)
    for bf16 in (False, True):
        # without bf16 instructions torch's bf16 fallback is slow: a smaller volume
        size = 48 if not bf16 or precision.cpu_has_bf16() else 24
        tflops, seconds = conv_rate(bf16, size)
        top = None if peak is None else (peak.bf16_tflops if bf16 else peak.fp32_tflops)
        if top:
            against = (f"{100 * tflops / top:.1f}% of the {top:.3g} TFLOP/s peak "
                       f"({peak.formula(bf16)})")
        elif bf16:
            against = "no bf16 instructions on this CPU: torch's fallback kernels"
        else:
            against = "peak unknown (clock or FLOPs per cycle not found)"
        rows.add(device=label, measure="conv3d TFLOP/s", setting="bf16" if bf16 else "fp32",
                 value=tflops, unit="TFLOP/s",
                 notes=f"3x3x3 12->12, 4 x {size}^3 voxels, {seconds:.3f} s a call; "
                       + against)


def family(rows: Rows, label: str, device: torch.device, shape: tuple[int, int, int],
           n: int, tile: int, overlap: int) -> None:
    _cuda_peak_reset(device)
    r = bench_family(shape, n, None, str(device), None, tile, overlap, 4)
    peak = _cuda_peak(device)
    rows.add(device=label, measure="family", setting=f"{n} samples, "
             + "x".join(map(str, shape)), value=float(r["seconds"]), unit="s",
             notes=f"peak RSS {r['peak_rss_gb']:.2f} GiB (process), "
                   f"{r['samples_per_pass']} samples per pass, tile {r['tile']}"
                   + (f", peak GPU {_gib(peak)}" if peak else ""))


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="measure the CPU rows (small sizes)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a "
                    "temporary one)")
    ap.add_argument("--sizes", type=parse_size, nargs="+", default=None,
                    help="restore sizes ZxYxX (default GPU 256x512x512 512x1024x1024, CPU "
                    "48x96x96)")
    ap.add_argument("--family-shape", type=parse_size, default=None,
                    help="default GPU 256x512x512, CPU 32x64x64")
    ap.add_argument("--train-steps", type=int, default=None, help="default GPU 20, CPU 3")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 peak, if not in PEAK_BF16_TFLOPS")
    ap.add_argument("--cpu-fp32-flops-per-cycle", type=int, default=None,
                    help="one core's float32 FLOPs per cycle, where benchmarks/cpu_peak.py "
                    "guesses wrong (e.g. 32 on a core with one AVX-512 FMA pipe)")
    ap.add_argument("--skip-tests", action="store_true")
    # child mode: one restore in a fresh process
    ap.add_argument("--restore-child", action="store_true", help=argparse.SUPPRESS)
    for a in ("--model", "--input", "--output", "--device"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    ap.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--overlap", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fp32", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.restore_child:
        restore_child(args)
        return 0
    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu:
        print(f"gpu_check: no CUDA GPU visible to torch {torch.__version__}; nothing "
              "measured (--cpu measures the CPU rows)")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    label = device_label(device)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (GPU_SIZES if on_gpu else CPU_SIZES)
    fam_shape = args.family_shape or ((256, 512, 512) if on_gpu else (32, 64, 64))
    steps = args.train_steps or (20 if on_gpu else 3)
    tile, overlap = (96, 32) if on_gpu else (48, 16)
    rows = Rows(args.out)
    t0 = time.perf_counter()
    print(f"gpu_check on {label} (torch {torch.__version__}); rows into {args.out}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if on_gpu and not args.skip_tests:
            cuda_tests(rows, label)
        for amp in ((False, True) if on_gpu else (False,)):
            train_speed(rows, label, device, work, steps, amp)
        first = None
        for shape in sizes:
            r = restore_speed(rows, label, device, work, shape, tile, overlap)
            first = first or (shape, r)
        if first and first[1]:
            conv_tflops(rows, label, device, work, first[0], tile, overlap,
                        first[1]["seconds"],
                        peak_tflops(label, args.peak_tflops) if on_gpu else None)
        if on_gpu:
            for variant in ("fp32", "channels_last"):
                restore_speed(rows, label, device, work, sizes[0], tile, overlap, variant)
        else:
            cpu_conv_rows(rows, label, args.cpu_fp32_flops_per_cycle)
            if precision.cpu_has_bf16():
                restore_speed(rows, label, device, work, sizes[0], tile, overlap, "bf16")
        family(rows, label, device, fam_shape, 16, tile, overlap)
    print(f"\n{rows.table()}\n\ncommand: {' '.join(sys.argv)}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
