"""Sampling benchmarks: cost of a family and whether groups of samples per pass pay.

    python benchmarks/bench_sampling.py group [--tile 48] [--channels 16] [--depth 3]
    python benchmarks/bench_sampling.py family --shape 256 512 512 --n 16 [--model M]
                                              [--device cpu] [--group G]

``group``: seconds per tile of the mean path and of the stochastic branch for groups of
1, 2, 4 and 8 samples (random weights; the cost does not depend on them), and the
resulting seconds per sample and tile.

``family``: writes a random memory-mapped tomogram of `--shape`, samples `--n` samples
with `cryowae.sampling.sample_file` (a random stochastic restorer, or `--model`) and
prints wall time and the process's peak resident memory (VmHWM), as JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _random_model(channels: int, depth: int, device: str):
    from cryowae.models.checkpoint import LoadedRestorer
    from cryowae.models.restorer import RestorerConfig
    from cryowae.models.stochastic import StochasticConfig, StochasticRestorer
    from cryowae.physics.geometry import TiltGeometry

    torch.manual_seed(0)
    m = StochasticRestorer(StochasticConfig(restorer=RestorerConfig(channels, depth),
                                            posterior=False)).eval().to(device)
    return LoadedRestorer(model=m.mean, voxel_size=10.0, norm=(0.0, 1.0),
                          geometry=TiltGeometry(-60.0, 60.0, "y", "model"), patch_size=64,
                          codes=torch.zeros(0, m.mean.latent_dim), train_config={},
                          device=torch.device(device), stochastic=m)


def bench_group(tile: int, channels: int, depth: int, repeats: int = 2) -> dict:
    r = _random_model(channels, depth, "cpu")
    m = r.stochastic
    x = torch.randn(1, 1, tile, tile, tile)
    out: dict = {"tile": tile, "channels": channels, "depth": depth, "threads":
                 torch.get_num_threads()}
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, feats, _ = m.mean_and_features(x)
            out["mean_path_s"] = time.perf_counter() - t0
        for g in (1, 2, 4, 8):
            z = m.draw_prior(x.shape[-3:], 1, g)
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.decode_branch(feats, z)
                dt = time.perf_counter() - t0
            out[f"branch_{g}_s"] = dt
            out[f"per_sample_group_{g}_s"] = (out["mean_path_s"] + dt) / g
    return out


def bench_family(shape: tuple[int, int, int], n: int, model: str | None, device: str,
                 group: int | None, tile: int, overlap: int, batch: int) -> dict:
    from cryowae.io import open_mrc_writer
    from cryowae.models.checkpoint import load_restorer
    from cryowae.sampling import sample_file
    from cryowae.sampling.settings import SamplerSettings
    from cryowae.tiling.settings import TileSettings

    r = load_restorer(model, device) if model else _random_model(16, 3, device)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tomo.mrc"
        with open_mrc_writer(src, shape, 10.0) as mm:
            rng = np.random.default_rng(0)
            for z in range(0, shape[0], 8):
                mm[z:z + 8] = rng.normal(size=(min(8, shape[0] - z), *shape[1:]))
        base = _peak_rss()
        t0 = time.perf_counter()
        sample_file(r, src, Path(tmp) / "fam",
                    SamplerSettings(n, tiles=TileSettings(tile, overlap, batch), group=group))
        seconds = time.perf_counter() - t0
        meta = json.loads((Path(tmp) / "fam" / "family.json").read_text())
    return {"shape": list(shape), "n": n, "device": device, "seconds": round(seconds, 1),
            "peak_rss_gb": round(_peak_rss() / 2**30, 3),
            "peak_rss_before_gb": round(base / 2**30, 3),
            "samples_per_pass": meta["samples_per_pass"], "tile": meta["tile"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True)
    g = sub.add_parser("group")
    g.add_argument("--tile", type=int, default=48)
    g.add_argument("--channels", type=int, default=16)
    g.add_argument("--depth", type=int, default=3)
    f = sub.add_parser("family")
    f.add_argument("--shape", type=int, nargs=3, default=(256, 512, 512))
    f.add_argument("--n", type=int, default=16)
    f.add_argument("--model", default=None)
    f.add_argument("--device", default="cpu")
    f.add_argument("--group", type=int, default=None)
    f.add_argument("--tile", type=int, default=96)
    f.add_argument("--overlap", type=int, default=32)
    f.add_argument("--batch-size", type=int, default=4)
    a = ap.parse_args()
    if a.part == "group":
        print(json.dumps(bench_group(a.tile, a.channels, a.depth)))
    else:
        print(json.dumps(bench_family(tuple(a.shape), a.n, a.model, a.device, a.group,
                                      a.tile, a.overlap, a.batch_size)))


if __name__ == "__main__":
    main()
