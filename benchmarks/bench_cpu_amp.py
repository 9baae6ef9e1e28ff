"""CPU compute path: float32 against bf16 autocast, restore and training, one process a run.

    python benchmarks/bench_cpu_amp.py restore MODEL TOMO OUT.npy --amp off|on [--crop Z Y X]
    python benchmarks/bench_cpu_amp.py train TOMO --steps 5 --amp off|on [--preset cpu-small]
    python benchmarks/bench_cpu_amp.py compare REF.npy OTHER.npy
    python benchmarks/bench_cpu_amp.py convs [--size 48]

``restore`` restores TOMO (or its central crop) with MODEL under `ComputeSettings(amp=...)`
and saves the float32 result as .npy; each run is one process, so an outside timer
(e.g. ``/usr/bin/time -v``) pairs float32 and bf16 runs. ``train`` runs `Trainer` steps
at a preset and prints steps per minute (after one untimed step). ``compare`` prints the
relative RMS difference sqrt(mean((b - a)^2) / mean(a^2)) of OTHER from REF.

``--emulate-bf16`` reports this CPU as having bf16 instructions (`cryowae.precision.
cpu_bf16_flags`), so that ``--amp on`` runs torch's CPU bf16 autocast where the CPU lacks
them: the numbers are then those a bf16 CPU computes (up to the order of its sums), the
times are those of torch's slower fallback kernels and say nothing of a bf16 CPU's speed.

``convs`` times one 3x3x3 convolution (batch 4, 12 -> 12 channels, size^3 voxels) in
float32 and in bf16 autocast and prints GFLOP/s of each (2 FLOPs per multiply-add).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _emulate(on: bool) -> None:
    if on:
        import cryowae.precision as precision

        precision.cpu_bf16_flags = lambda: ("emulated",)  # see the module docstring


def _amp(value: str) -> bool:
    return value == "on"


def cmd_restore(a: argparse.Namespace) -> None:
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume
    from cryowae.io.stats import volume_stats
    from cryowae.models.checkpoint import load_restorer
    from cryowae.precision import ComputeSettings, amp_active

    _emulate(a.emulate_bf16)
    with read_volume(a.tomo) as vol:
        data = np.asarray(vol.data, np.float32)
    norm = volume_stats(data)  # the whole tomogram's statistics, crop or not
    if a.crop:
        lo = [(s - c) // 2 for s, c in zip(data.shape, a.crop, strict=True)]
        data = np.ascontiguousarray(data[tuple(slice(o, o + c)
                                               for o, c in zip(lo, a.crop, strict=True))])
    restorer = load_restorer(a.model, "cpu")
    compute = ComputeSettings(amp=_amp(a.amp))
    t0 = time.perf_counter()
    out = restore_array(restorer, data, tile=a.tile, overlap=a.overlap,
                        batch_size=a.batch_size, norm=norm, compute=compute)
    dt = time.perf_counter() - t0
    np.save(a.out, np.asarray(out, np.float32))
    print(f"restore {'x'.join(map(str, data.shape))} amp={a.amp} "
          f"bf16={amp_active('cpu', _amp(a.amp))} threads={torch.get_num_threads()}: "
          f"{dt:.2f} s")


def cmd_train(a: argparse.Namespace) -> None:
    from cryowae.precision import amp_active
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    _emulate(a.emulate_bf16)
    cfg = load_config(a.preset).replace(device="cpu", amp=_amp(a.amp), seed=0,
                                        steps=a.steps + 1, check_prior_preference=False)
    sources = load_sources([a.tomo], [], [], min_size=cfg.patch_size)
    tr = Trainer(sources, cfg, Path(a.run_dir))
    tr.train_step()  # first step: allocation, bank start
    t0 = time.perf_counter()
    losses = [tr.train_step()["rec"] for _ in range(a.steps)]
    dt = time.perf_counter() - t0
    print(f"train {a.preset} amp={a.amp} bf16={amp_active('cpu', _amp(a.amp))} "
          f"threads={torch.get_num_threads()}: {a.steps} steps in {dt:.1f} s = "
          f"{60 * a.steps / dt:.2f} steps/min; rec {losses[0]:.4f} .. {losses[-1]:.4f}")


def cmd_compare(a: argparse.Namespace) -> None:
    ref, other = np.load(a.ref).astype(np.float64), np.load(a.other).astype(np.float64)
    rel = float(np.sqrt(np.mean((other - ref) ** 2) / np.mean(ref ** 2)))
    print(f"relative RMS of {a.other} from {a.ref}: {rel:.3e} "
          f"(max abs {np.abs(other - ref).max():.3e}, bit-identical {np.array_equal(ref, other)})")


def cmd_convs(a: argparse.Namespace) -> None:
    x = torch.randn(4, 12, a.size, a.size, a.size)
    conv = torch.nn.Conv3d(12, 12, 3, padding=1)
    flops = 2 * 12 * 12 * 27 * x[:, 0].numel()
    for amp in (False, True):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=amp):
            conv(x)
            t0 = time.perf_counter()
            conv(x)
            dt = time.perf_counter() - t0
        print(f"conv3d {'bf16' if amp else 'fp32'}: {dt:.3f} s, {flops / dt / 1e9:.1f} GFLOP/s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("restore")
    r.add_argument("model")
    r.add_argument("tomo")
    r.add_argument("out")
    r.add_argument("--amp", choices=("off", "on"), required=True)
    r.add_argument("--crop", type=int, nargs=3)
    r.add_argument("--tile", type=int, default=96)
    r.add_argument("--overlap", type=int, default=32)
    r.add_argument("--batch-size", type=int, default=4)
    r.add_argument("--emulate-bf16", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("tomo")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--amp", choices=("off", "on"), required=True)
    t.add_argument("--preset", default="cpu-small")
    t.add_argument("--run-dir", default="/tmp/bench_cpu_amp_run")
    t.add_argument("--emulate-bf16", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("ref")
    c.add_argument("other")
    v = sub.add_parser("convs")
    v.add_argument("--size", type=int, default=48)
    a = p.parse_args(argv)
    {"restore": cmd_restore, "train": cmd_train, "compare": cmd_compare,
     "convs": cmd_convs}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
