"""Fourier shell correlation (FSC) and the resolution at which it crosses a threshold.

The curve comes from ``torch-fourier-shell-correlation``
(`torch_fourier_shell_correlation.fourier_shell_correlation`). That package handles
non-cubic volumes itself: its shells are spaced by ``1 / min(Z, Y, X)`` cycles per voxel
and every Fourier coefficient contributes to its two nearest shells with linear
weights, so no cropping or padding is needed here. Frequencies are isotropic in cycles
per voxel (each axis' FFT frequencies), so the curve is correct for any box shape; the
shell spacing is set by the shortest axis. Shell 0 (DC) is defined as 1 by the package
and is left out of the curves returned here.

Cost: the package visits every Fourier coefficient once per shell, so time grows as
voxels x shells (about 2 s for 96 x 192 x 192 on one CPU core); evaluate large
tomograms on a GPU tensor or on a cropped region.

Resolution is reported in Angstrom, as ``voxel_size / frequency`` with frequency in
cycles per voxel; Nyquist is ``2 * voxel_size``.

The FSC over a *region* of Fourier space (the measured region of a tilt series, used
for the even/odd SNR of soft data consistency) is another function,
`cryowae.physics.fourier.masked_fsc`: it sums only the coefficients inside a mask, in
one ``bincount`` pass over the spectrum rather than one pass per shell (whole tomograms),
on finer shells (``1 / max(Z, Y, X)``, nearest shell, no linear split). The curve here
is the plain whole-spectrum FSC of the package, the resolution measure users compare
with other programs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_tensor, check_pair


@dataclass
class FSCCurve:
    """An FSC curve without its DC shell.

    Attributes
    ----------
    frequency
        Shell frequencies in cycles per voxel, increasing, (n_shells,).
    fsc
        Correlation per shell, (n_shells,).
    voxel_size
        Angstrom per voxel.
    """

    frequency: np.ndarray
    fsc: np.ndarray
    voxel_size: float

    @property
    def resolution_A(self) -> np.ndarray:
        """Shell resolutions in Angstrom (``voxel_size / frequency``)."""
        return self.voxel_size / self.frequency

    def resolution_at(self, threshold: float) -> float:
        """Resolution (Angstrom) where the curve first falls below `threshold`."""
        return fsc_resolution(self.frequency, self.fsc, threshold, self.voxel_size)

    def as_list(self) -> list[list[float]]:
        """``[[resolution_A, fsc], ...]`` from low to high frequency (JSON-friendly)."""
        return [[float(r), float(c)] for r, c in zip(self.resolution_A, self.fsc, strict=True)]


def fourier_shell_correlation(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """FSC between two (Z, Y, X) volumes of one shape, any box shape.

    Returns
    -------
    frequency, fsc
        Shell frequencies in cycles per voxel (DC excluded, up to ~0.5) and the
        correlation of each shell (real part of the normalised cross-power sum). A
        shell where either volume has no power gets 0.
    """
    from torch_fourier_shell_correlation import fourier_shell_correlation as _fsc

    ta, tb = as_tensor(a, "restored"), as_tensor(b, "gt")
    check_pair(ta, tb)
    if min(ta.shape) < 4:
        raise CryowaeInputError(f"FSC needs at least 4 voxels along every axis, got shape "
                                f"{tuple(ta.shape)}")
    with torch.no_grad():
        curve = _fsc(ta, tb).to(torch.float64).cpu().numpy()
    freq = np.fft.rfftfreq(min(ta.shape))
    return freq[1:], curve[1:]


def fsc_resolution(frequency: np.ndarray, fsc: np.ndarray, threshold: float,
                   voxel_size: float) -> float:
    """Resolution (Angstrom) at the first crossing of `threshold`.

    The first shell whose FSC is below the threshold and its predecessor are
    interpolated linearly in frequency (the predecessor of the first shell is DC, where
    FSC = 1). If the curve never falls below the threshold the resolution is Nyquist,
    ``2 * voxel_size``: the data support at least that.
    """
    f = np.concatenate([[0.0], np.asarray(frequency, dtype=np.float64)])
    c = np.concatenate([[1.0], np.asarray(fsc, dtype=np.float64)])
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return 2.0 * float(voxel_size)
    i = int(below[0])
    f0, f1, c0, c1 = f[i - 1], f[i], c[i - 1], c[i]
    fx = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0) if c0 != c1 else f1
    if fx <= 0.0:
        return float("inf")
    return float(voxel_size) / float(fx)


def fsc_curve(a: Any, b: Any, voxel_size: float) -> FSCCurve:
    """The FSC curve of two volumes with its voxel size attached (Angstrom per voxel)."""
    if not voxel_size > 0:
        raise CryowaeInputError(f"voxel size must be positive, got {voxel_size!r} A")
    freq, c = fourier_shell_correlation(a, b)
    return FSCCurve(frequency=freq, fsc=c, voxel_size=float(voxel_size))
