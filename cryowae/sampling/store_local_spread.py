"""The local spread step (`cryowae.sampling.local_spread`) on a family held in a writable
(S, Z, Y, X) store (a zarr array), in place, slab by slab and resumable.

Steps, each recorded in the caller's `state` and saved: the per-voxel maps in
``workdir`` (memory-mapped float32 .npy files): the family mean m and variance V, the
centre's feature H (its measured power F, then combined with its total power P) and
the gain g; then per sample ``m + g (X_s - m)`` into
``workdir/local_sample.npy`` and its copy into the store, so that a rerun never
modulates a sample twice. Gaussian smoothing runs on Z slabs with a halo of 3 sigma
(`smooth_slabs`) and the measured component on blocks of planes (`measured_square`):
memory is a few slabs, not volumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryowae.metrics.sparsification import gaussian_smooth
from cryowae.physics.geometry import TiltGeometry
from cryowae.sampling.local_spread import (
    LocalSpreadSettings,
    combine_powers,
    measured_square,
    normalising_factor,
    raw_gain_squared,
    total_square,
    variance_floor,
)
from cryowae.tiling.pages import release_pages

#: bytes of one float64 slab
SLAB_BYTES = 8 << 20

Reader = Callable[[int, int], np.ndarray]


class _PagedMap:
    """A float32 ``.npy`` memory map in ``workdir`` read and written slab by slab, its
    pages handed back after every access (`cryowae.tiling.pages`): the maps stay on
    disk, not resident (numpy's memmap keeps every page it touched)."""

    def __init__(self, path: Path, shape: tuple[int, ...] | None = None) -> None:
        self.map = (np.lib.format.open_memmap(path, "w+", np.float32, shape)
                    if shape is not None else np.load(path, mmap_mode="r"))
        self.shape = tuple(self.map.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self.map[key])
        release_pages(self.map)
        return out

    def __setitem__(self, key: Any, value: Any) -> None:
        self.map[key] = value
        release_pages(self.map, flush=True)


def _step(shape: tuple[int, ...]) -> int:
    return max(1, SLAB_BYTES // max(1, 8 * shape[1] * shape[2]))


def smooth_slabs(read: Reader, shape: tuple[int, int, int], sigma: float, out: Any) -> Any:
    """G_sigma * v of a volume read by ``read(z0, z1)`` (its Z slab) into `out`, one Z
    slab at a time with a halo of ceil(3 sigma) slices (the volume's own faces
    mirrored, as `gaussian_smooth`)."""
    halo = int(math.ceil(3 * sigma))
    step = max(_step(shape), halo)
    for z in range(0, shape[0], step):
        lo, hi = max(0, z - halo), min(shape[0], z + step + halo)
        block = gaussian_smooth(torch.from_numpy(np.asarray(read(lo, hi), np.float64)), sigma)
        out[z:z + step] = block[z - lo:z - lo + min(step, shape[0] - z)].numpy()
    release_pages(out, flush=True)
    return out


def store_moments(samples: Any, mean_out: Any, var_out: Any) -> None:
    """Per-voxel mean and unbiased variance of (S, Z, Y, X) `samples`, summed in float64
    slab by slab."""
    n, shape = int(samples.shape[0]), tuple(int(v) for v in samples.shape[1:])
    step = _step(shape)
    for z in range(0, shape[0], step):
        acc = np.zeros((min(step, shape[0] - z), *shape[1:]), np.float64)
        sq = np.zeros_like(acc)
        for i in range(n):
            x = np.asarray(samples[i, z:z + step], np.float64)
            acc += x
            sq += x * x
        m = acc / n
        mean_out[z:z + step] = m
        var_out[z:z + step] = np.clip(sq - n * m * m, 0.0, None) / max(n - 1, 1)
    for a in (mean_out, var_out):
        release_pages(a, flush=True)


def _maps(samples: Any, centre: Any, geometry: TiltGeometry, st: LocalSpreadSettings,
          workdir: Path) -> dict[str, float]:
    """m, V, the feature H and g into ``workdir`` (module docstring); returns the
    gain's range."""
    shape = tuple(int(v) for v in samples.shape[1:])

    def mm(name: str) -> _PagedMap:
        return _PagedMap(workdir / f"local_{name}.npy", shape)

    mean, var = mm("mean"), mm("var")
    store_moments(samples, mean, var)
    square = measured_square(centre, geometry, mm("component"))
    step = _step(shape)
    feature = smooth_slabs(lambda a, b: square[a:b], shape, st.feature_sigma,
                           mm("feature"))
    if st.total_weight > 0:
        square = total_square(centre, square)
        total = smooth_slabs(lambda a, b: square[a:b], shape, st.feature_sigma,
                             mm("total"))
        for z in range(0, shape[0], step):
            feature[z:z + step] = combine_powers(feature[z:z + step], total[z:z + step], st)
    voxels = float(np.prod(shape))
    f_mean = sum(float(np.asarray(feature[z:z + step], np.float64).sum())
                 for z in range(0, shape[0], step)) / voxels
    total = sum(float(np.asarray(var[z:z + step], np.float64).sum())
                for z in range(0, shape[0], step))
    floor = variance_floor(total, int(voxels))
    gain = mm("gain")

    def weighted(g2: Any) -> float:
        return sum(float((np.asarray(g2[z:z + step], np.float64)
                          * np.asarray(var[z:z + step], np.float64)).sum())
                   for z in range(0, shape[0], step))

    for z in range(0, shape[0], step):
        gain[z:z + step] = raw_gain_squared(feature[z:z + step], var[z:z + step], st,
                                            f_mean, floor).numpy()
    c1 = normalising_factor(total, weighted(gain))
    lo, hi = st.max_gain**-2, st.max_gain**2
    for z in range(0, shape[0], step):
        gain[z:z + step] = np.clip(np.asarray(gain[z:z + step], np.float64) * c1, lo, hi)
    c2 = normalising_factor(total, weighted(gain))
    lo, hi = math.inf, -math.inf
    for z in range(0, shape[0], step):
        g = np.sqrt(np.asarray(gain[z:z + step], np.float64) * c2).astype(np.float32)
        gain[z:z + step] = g
        lo, hi = min(lo, float(g.min())), max(hi, float(g.max()))
    return {"gain_min": lo, "gain_max": hi}


def localise_store(samples: Any, centre: Any, geometry: TiltGeometry,
                   state: dict[str, Any], save: Callable[[], None], workdir: Path,
                   settings: LocalSpreadSettings | None = None) -> dict[str, Any]:
    """The local step on a writable (S, Z, Y, X) store in place, resumably (module
    docstring); returns what ``family.json`` records. `centre` (Z, Y, X): the
    restoration the family is centred on (its measured power gives v)."""
    st = settings or LocalSpreadSettings()
    n = int(samples.shape[0])
    shape = tuple(int(v) for v in samples.shape[1:])
    state.setdefault("done", [])
    if not state.get("maps"):
        state["maps"] = _maps(samples, centre, geometry, st, workdir)
        save()

    def load(name: str) -> _PagedMap:
        return _PagedMap(workdir / f"local_{name}.npy")

    todo = [i for i in range(n) if i not in set(state["done"])]
    # a rerun after the last sample has nothing to load (the maps may be removed)
    mean, gain = (load("mean"), load("gain")) if todo else (None, None)
    tmp = workdir / "local_sample.npy"
    step = _step(shape)
    for i in todo:
        if state.get("modulated") != i:
            out = _PagedMap(tmp, shape)
            for z in range(0, shape[0], step):
                m = mean[z:z + step]
                out[z:z + step] = m + gain[z:z + step] * (
                    np.asarray(samples[i, z:z + step], np.float32) - m)
            del out
            state["modulated"] = i
            save()
        mod = _PagedMap(tmp)
        for z in range(0, shape[0], step):
            samples[i, z:z + step] = np.asarray(mod[z:z + step])
        state["done"].append(i)
        save()
    for name in ("mean", "var", "component", "feature", "total", "gain", "sample"):
        (workdir / f"local_{name}.npy").unlink(missing_ok=True)
    return {"gain": state["maps"], "settings": st.describe(),
            "columns": "v = (H / mean H)^b, H = F^(1 - a) P^a, F the centre's measured "
                       "power, P its total power, a = total_weight; g^2 ~ v / the "
                       "family's per-voxel variance, total variance kept"}


__all__ = ["localise_store", "smooth_slabs", "store_moments"]
