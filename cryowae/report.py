"""A picture and a short Markdown report of a restoration (used by the demo and benchmarks)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.io.atomic import atomic_path


def _robust_limits(a: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(a, [1, 99])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def slice_figure(path: str | os.PathLike, volumes: Mapping[str, Any],
                 title: str = "") -> Path:
    """Save a PNG with, for each volume, its central XY (z = Z/2) and XZ (y = Y/2) slices.

    `volumes` maps a row label to a (Z, Y, X) array-like; rows named like 'std' are
    drawn with the 'magma' colour map, the others in grey with robust contrast.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(volumes)
    fig, axes = plt.subplots(n, 2, figsize=(8, 2.6 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1]})
    for row, (label, vol) in enumerate(volumes.items()):
        a = np.asarray(vol, dtype=np.float32)
        xy = a[a.shape[0] // 2]
        xz = a[:, a.shape[1] // 2, :]
        cmap = "magma" if "std" in label.lower() else "gray"
        lo, hi = _robust_limits(a[::2, ::2, ::2])
        for col, (img, name) in enumerate(((xy, "XY"), (xz, "XZ"))):
            ax = axes[row, col]
            ax.imshow(img, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_title(f"{label} ({name})", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=110)


def read_curve(metrics_csv: str | os.PathLike, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one column of a run's ``metrics.csv``, rows where it is empty
    left out."""
    import csv

    steps, values = [], []
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(column) not in (None, "") and row.get("step") not in (None, ""):
                steps.append(int(float(row["step"])))
                values.append(float(row[column]))
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def training_curve(metrics_csv: str | os.PathLike, path: str | os.PathLike,
                   plateau_step: float | None = None) -> Path:
    """A PNG of a run's training curve: the training loss (``loss``) and the held-out
    validation loss (``val_loss``, when logged) against the step, log-scaled, with the
    step of the plateau call (`plateau_step`; None or NaN: none) as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for column, label in (("loss", "train loss"), ("val_loss", "validation loss")):
        x, y = read_curve(metrics_csv, column)
        if len(x):
            ax.plot(x, y, label=label, marker="." if column == "val_loss" else None)
    if plateau_step is not None and plateau_step == plateau_step:
        ax.axvline(float(plateau_step), color="grey", linestyle="--",
                   label=f"plateau (step {int(plateau_step)})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if ax.has_data() and all(v > 0 for line in ax.get_lines()[:2] for v in line.get_ydata()):
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("training curve", fontsize=10)
    return save_figure(fig, path, dpi=100)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, write it as PNG atomically (temporary name, then
    rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return out


def write_markdown_report(path: str | os.PathLike, title: str,
                          metrics: Mapping[str, Mapping[str, float]], image: str | None,
                          notes: list[str] | None = None) -> Path:
    """A Markdown report: a table of metrics per row label, the picture and notes."""
    keys = ["pearson", "psnr_db", "cc_measured", "cc_wedge", "fsc_0143_A", "fsc_05_A"]
    lines = [f"# {title}", "", "| volume | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for label, m in metrics.items():
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if image:
        lines += ["", f"![central slices]({image})"]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({k: dict(v) for k, v in metrics.items()}, indent=2,
                                  default=float))
    return out
