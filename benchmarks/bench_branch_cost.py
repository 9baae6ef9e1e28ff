"""What one posterior sample costs against the mean path, on one tile.

    OMP_NUM_THREADS=1 python benchmarks/bench_branch_cost.py MODEL [--tile 96] [--m 4] \
        [--layout contiguous|channels_last] [--compile]

For a trained stochastic restorer (a ``model.pt`` with a family branch), on a random
tile of ``tile^3`` voxels (batch 1), prints the wall time (best of 3 after one warm-up
run) and the floating-point operations (``torch.utils.flop_counter.FlopCounterMode``:
the convolutions and matrix products) of:

- the mean path with its decoder features (`StochasticRestorer.mean_and_features`),
  what one restoration computes per tile;
- the branch's terms of those features (`branch_terms`), once per tile for all samples;
- the branch for ``m`` samples (`decode_branch`), and per sample.

``--layout channels_last`` converts the model and the tile to ``channels_last_3d``
(`cryowae.precision.prepare`, `to_layout`); ``--compile`` times `torch.compile`d
versions of the three calls (inductor), after a first call that compiles them (its time
printed) and checks their outputs against the eager calls' (largest absolute
difference). FLOPs are counted on the eager calls.

The sampling pass of ``cryowae sample --n N`` computes, per tile, the mean path once,
the terms once and the branch N times: per tile it costs
``1 + terms + N x branch-per-sample`` mean paths, the ratio the last line prints for N=16.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from cryowae.models.checkpoint import load_restorer
from cryowae.precision import ComputeSettings, prepare, to_layout


def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _largest_difference(a: object, b: object) -> float:
    """Largest absolute difference between the tensors of two outputs (nested alike)."""
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max())
    return max((_largest_difference(u, v) for u, v in zip(a, b, strict=True)),
               default=0.0)


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tile", type=int, default=96)
    ap.add_argument("--m", type=int, default=4, help="samples per branch call")
    ap.add_argument("--layout", choices=("contiguous", "channels_last"),
                    default="contiguous")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    loaded = load_restorer(args.model)
    model = loaded.stochastic
    if model is None:
        raise SystemExit(f"{args.model}: no family branch in this model")
    model.eval()
    print(f"model: {model.config}")
    layout = args.layout == "channels_last"
    prepare(model, ComputeSettings(channels_last=layout))
    x = to_layout(torch.randn(1, 1, args.tile, args.tile, args.tile,
                              generator=torch.Generator().manual_seed(0)), layout)
    z = model.draw_prior(x.shape[-3:], 1, args.m, torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, feats, _ = model.mean_and_features(x)
        terms = model.branch_terms(feats)
        calls = (model.mean_and_features, model.branch_terms, model.decode_branch)
        eager = {
            "mean path": (lambda: model.mean_and_features(x)),
            "branch terms (once per tile)": (lambda: model.branch_terms(feats)),
            f"branch, {args.m} samples": (lambda: model.decode_branch(feats, z, terms)),
        }
        rows = eager
        if args.compile:
            mf, bt, db = (torch.compile(c) for c in calls)
            rows = {
                "mean path": (lambda: mf(x)),
                "branch terms (once per tile)": (lambda: bt(feats)),
                f"branch, {args.m} samples": (lambda: db(feats, z, terms)),
            }
            t0 = time.perf_counter()
            diffs = [_largest_difference(rows[k](), eager[k]()) for k in rows]
            print(f"compiling: {time.perf_counter() - t0:.1f} s; largest difference from "
                  f"the eager calls: " + ", ".join(f"{d:.2g}" for d in diffs))
        got = {k: (_best(rows[k]), _flops(eager[k])) for k in rows}
    t_mean, f_mean = got["mean path"]
    print(f"tile {args.tile}^3, {torch.get_num_threads()} thread(s), layout {args.layout}"
          f"{', compiled' if args.compile else ''}")
    print(f"{'part':32s} {'seconds':>8s} {'GFLOP':>8s} {'x mean (time)':>14s} "
          f"{'x mean (FLOP)':>14s}")
    for k, (t, f) in got.items():
        print(f"{k:32s} {t:8.2f} {f / 1e9:8.2f} {t / t_mean:14.2f} {f / f_mean:14.2f}")
    t_s, f_s = (v / args.m for v in got[f"branch, {args.m} samples"])
    t_t, f_t = got["branch terms (once per tile)"]
    print(f"{'branch per sample':32s} {t_s:8.2f} {f_s / 1e9:8.2f} {t_s / t_mean:14.2f} "
          f"{f_s / f_mean:14.2f}")
    n = 16
    print(f"sampling pass of {n} samples per tile: "
          f"{(t_mean + t_t + n * t_s) / t_mean:.1f} mean paths (time), "
          f"{(f_mean + f_t + n * f_s) / f_mean:.1f} (FLOP)")


if __name__ == "__main__":
    main()
