"""Benchmark the latent divergences: time and peak memory of forward + backward, and
the prefers-prior start-up check, on the CPU.

Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_divergences.py

Peak memory is the rise of the process's peak resident set size (VmHWM, reset through
/proc/self/clear_refs before each measurement) above the resident size at the start of
the measurement; it includes everything the call allocates (kernel tiles, autograd
buffers, GeomLoss's cost matrices). Times are wall-clock of one call (after one warm-up
at the smallest size) and are rough on a shared machine.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shlex
import sys
import time

import torch
from proc_memory import reset_peak, vm_kb

from cryowae.divergences import GaussianPrior, build_divergence, prefers_prior


def _fix_malloc() -> None:
    """Make freed memory go back to the OS so that RSS peaks are per measurement:
    a fixed mmap threshold (glibc otherwise raises it after each large free and keeps
    later large blocks on the heap) and a trim before each measurement."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        _LIBC.append(libc)
    except (OSError, AttributeError):
        pass


_LIBC: list = []


def measure(fn) -> tuple[float, float]:
    """(seconds, peak MiB above the starting RSS) of ``fn()``."""
    gc.collect()
    if _LIBC:
        _LIBC[0].malloc_trim(0)
    ok = reset_peak()
    base = vm_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    peak = (vm_kb("VmHWM") - base) / 1024 if ok else float("nan")
    gc.collect()
    return dt, peak


def fwd_bwd(div, name: str, n: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    zq = torch.randn(n, dim, generator=g).mul_(0.8).add_(0.1).requires_grad_()
    zp = torch.randn(n, dim, generator=g)

    def run():
        if name == "adversarial":
            div.discriminator_step(zq.detach(), zp)
        v = div(zq, zp)
        v.backward()
        assert zq.grad is not None and bool(torch.isfinite(zq.grad).all())
        zq.grad = None

    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dense-max", type=int, default=4096, help="skip dense MMD above this")
    ap.add_argument(
        "--sinkhorn-max",
        type=int,
        default=4096,
        help="skip Sinkhorn (tensorized, O(N^2) memory, ~minutes) above this",
    )
    ap.add_argument("--check-sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--check-seeds", type=int, default=5)
    ap.add_argument(
        "--sinkhorn-check-blurs", type=float, nargs="+", default=[1.0, 4.0],
        help="blurs (x sigma) for the Sinkhorn prefers-prior check (at 1,024 codes only "
        "unless --sinkhorn-check-max is raised)",
    )
    ap.add_argument("--sinkhorn-check-max", type=int, default=1024)
    args = ap.parse_args(argv)
    _fix_malloc()

    cmd = " ".join(
        [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] if "OMP_NUM_THREADS" in os.environ
        else []
    )
    argv_s = " ".join(shlex.quote(a) for a in sys.argv)
    print(f"command: {cmd + ' ' if cmd else ''}{os.path.relpath(sys.executable)} {argv_s}")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"date {time.strftime('%Y-%m-%d %H:%M')}"
    )
    dim = args.dim
    prior = GaussianPrior(dim)
    configs = [
        ("mmd", "mmd blockwise (IMQ, block 1024)", {}),
        ("mmd", "mmd dense (IMQ)", {"implementation": "dense"}),
        ("mmd", "mmd blockwise (RBF)", {"kernel": "rbf"}),
        ("sinkhorn", "sinkhorn (blur 4, scaling 0.9, tensorized)", {}),
        ("sliced", "sliced (128 projections)", {}),
        ("adversarial", "adversarial (4x512 MLP, +1 D step)", {}),
        ("none", "none", {}),
    ]
    # calibration: a dense N x N float32 matrix at the largest size would need this much
    n_cal = 4096
    _, cal = measure(lambda: torch.ones(n_cal, n_cal).sum())
    print(f"memory calibration: one {n_cal} x {n_cal} float32 matrix measured as {cal:.1f} MiB "
          f"(expected {n_cal * n_cal * 4 / 2**20:.1f})")
    # warm-up (thread pools, GeomLoss imports) at a small size, not reported
    for name, _, opts in configs:
        fwd_bwd(build_divergence(name, dim, prior, **opts), name, 256, dim)()

    print()
    print(f"forward + backward, d = {dim}, n codes vs n prior samples")
    print(f"{'divergence':46s} {'N':>7s} {'time s':>9s} {'peak MiB':>9s}")
    t_all = time.perf_counter()
    for n in args.sizes:
        for name, label, opts in configs:
            if opts.get("implementation") == "dense" and n > args.dense_max:
                print(f"{label:46s} {n:7d} {'skipped (dense above --dense-max)':>30s}")
                continue
            if name == "sinkhorn" and n > args.sinkhorn_max:
                need = 4 * n * n * 4 / 2**30
                print(
                    f"{label:46s} {n:7d} {'skipped':>9s}  (tensorized: >= {need:.0f} GiB "
                    "of cost matrices; needs KeOps)"
                )
                continue
            div = build_divergence(name, dim, prior, **opts)
            dt, peak = measure(fwd_bwd(div, name, n, dim))
            print(f"{label:46s} {n:7d} {dt:9.3f} {peak:9.1f}", flush=True)

    print()
    print(
        f"prefers-prior check (d = {dim}, {args.check_seeds} seeds, margin 10 null spreads; "
        "contracted N(0, 0.5 sigma^2 I), shifted |mu| = 1 sigma)"
    )
    checks: list[tuple[str, dict, int]] = []
    for n in args.check_sizes:
        checks.append(("mmd", {}, n))
        checks.append(("sliced", {}, n))
        for blur in args.sinkhorn_check_blurs:
            if n <= args.sinkhorn_check_max:
                checks.append(("sinkhorn", {"blur": blur}, n))
    checks.append(("mmd", {"kernel": "rbf"}, args.check_sizes[0]))
    for name, opts, n in checks:
        div = build_divergence(name, dim, prior, **opts)
        res = prefers_prior(div, prior, n, n_seeds=args.check_seeds)
        extra = f" {opts}" if opts else ""
        print(f"  [{res.seconds:6.1f} s]{extra} {res.message}", flush=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
