"""How much of a raw tomogram a restoration passes through, per resolution shell.

    python benchmarks/bench_passthrough.py RESTORED RAW [--voxel-size 40]

Both volumes are normalised to mean 0 and std 1; per shell of |k| (cycles per voxel)
the script prints the correlation of their Fourier coefficients and the restoration's
power over the raw's. A restorer that denoises keeps the correlation high where the raw
has signal and lowers the power where the raw is noise; one that copies its input has
correlation near 1 and power near 1 in the noise-dominated shells too.
"""

from __future__ import annotations

import argparse

import numpy as np

from cryowae.io import read_volume

SHELLS = ((0.05, 0.10), (0.10, 0.15), (0.15, 0.20), (0.20, 0.25), (0.25, 0.35), (0.35, 0.50))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("restored")
    ap.add_argument("raw")
    ap.add_argument("--voxel-size", type=float, default=None)
    a = ap.parse_args()
    vols = []
    for path in (a.raw, a.restored):
        v = read_volume(path, voxel_size=a.voxel_size).numpy().astype(np.float64)
        vols.append((v - v.mean()) / v.std())
    f, g = (np.fft.fftn(v) for v in vols)
    k = np.sqrt(sum(q ** 2 for q in np.meshgrid(*[np.fft.fftfreq(n) for n in f.shape],
                                                indexing="ij")))
    print("| cycles/voxel | correlation with the raw | power, restored / raw |")
    print("|---|---|---|")
    for lo, hi in SHELLS:
        m = (k >= lo) & (k < hi)
        pf, pg = (np.abs(f[m]) ** 2).sum(), (np.abs(g[m]) ** 2).sum()
        cc = np.real((f[m] * np.conj(g[m])).sum()) / np.sqrt(pf * pg)
        print(f"| {lo:.2f}-{hi:.2f} | {cc:.3f} | {pg / pf:.3f} |")


if __name__ == "__main__":
    main()
