"""Agreement in the measured and in the missing-wedge region of Fourier space.

A restorer can reproduce the measured frequencies perfectly and still leave the missing
wedge empty (or fill it with anything). These metrics score the two regions apart:

    cc(R) = Re( sum_{k in R} A(k) conj(B(k)) ) / sqrt( sum_R |A(k)|^2  sum_R |B(k)|^2 )

where A and B are the unnormalised DFTs of the restored and ground-truth volumes. The
regions are those of `cryowae.physics.wedge.wedge_mask` for the given tilt range
(measured: mask = 1; wedge: mask = 0), both restricted to the sphere
``|k| <= 0.5`` cycles per voxel (frequencies up to Nyquist along every direction; the
corners of the box beyond it are left out) and without the DC term. The sums run over
the full spectrum: the half spectrum of ``rfftn`` is weighted 2 for columns whose
Friedel mate is not stored, so results equal those of a full FFT. A region where either
volume has no energy (less than `EMPTY_FRACTION` of its total non-DC power, i.e. only
round-off) gives 0.
"""

from __future__ import annotations

from typing import Any

import torch

from cryowae.metrics._common import as_tensor, check_pair
from cryowae.physics.fourier import radial_frequency
from cryowae.physics.wedge import check_tilt_range, wedge_mask


def _hermitian_weights(nx: int, device: torch.device) -> torch.Tensor:
    """Multiplicity of each rfft column in the full spectrum: 1 for kx = 0 and, for even
    X, the Nyquist column; 2 for the others."""
    w = torch.full((nx // 2 + 1,), 2.0, dtype=torch.float32, device=device)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return w


#: a region holding less than this fraction of a volume's (non-DC) power counts as empty:
#: float32 FFT round-off leaves about 1e-14 of it in a region that was zeroed
EMPTY_FRACTION = 1e-10


def _cc(cross: torch.Tensor, pa: torch.Tensor, pb: torch.Tensor, region: torch.Tensor,
        total_a: float, total_b: float) -> tuple[float, float, float]:
    sab = float(cross[region].sum(dtype=torch.float64))
    saa = float(pa[region].sum(dtype=torch.float64))
    sbb = float(pb[region].sum(dtype=torch.float64))
    if saa <= EMPTY_FRACTION * total_a or sbb <= EMPTY_FRACTION * total_b:
        return 0.0, saa, sbb
    return max(-1.0, min(1.0, sab / (saa * sbb) ** 0.5)), saa, sbb


def region_correlations(restored: Any, gt: Any, tilt_min: float = -60.0,
                        tilt_max: float = 60.0, tilt_axis: str = "y") -> dict[str, float]:
    """Fourier correlation of `restored` with `gt` inside and outside the missing wedge.

    Parameters
    ----------
    restored, gt
        (Z, Y, X) volumes of one shape (torch, numpy or `Volume`).
    tilt_min, tilt_max
        Tilt range of the acquisition in degrees.
    tilt_axis
        ``"y"`` (default) or ``"x"``.

    Returns
    -------
    dict
        ``cc_measured`` and ``cc_wedge`` (in [-1, 1], 0 for a region without energy in
        either volume) and ``wedge_power_ratio``: power of `restored` in the wedge over
        that of `gt` (0 when the restoration leaves the wedge empty; nan when the ground
        truth has no power there).
    """
    check_tilt_range(tilt_min, tilt_max)
    a, b = as_tensor(restored, "restored"), as_tensor(gt, "gt")
    check_pair(a, b)
    shape = tuple(int(s) for s in a.shape)
    with torch.no_grad():
        fa = torch.fft.rfftn(a, dim=(-3, -2, -1))
        fb = torch.fft.rfftn(b.to(a.device), dim=(-3, -2, -1))
        w = _hermitian_weights(shape[-1], a.device)
        cross = (fa * fb.conj()).real * w  # float32 storage, float64 sums
        pa = fa.abs().square() * w
        pb = fb.abs().square() * w
        del fa, fb
        inside = radial_frequency(shape, rfft=True, device=a.device) <= 0.5
        inside[0, 0, 0] = False  # no DC
        measured = wedge_mask(shape, tilt_min, tilt_max, tilt_axis, rfft=True,
                              device=a.device) > 0.5
        total_a = float(pa.sum(dtype=torch.float64)) - float(pa[0, 0, 0])
        total_b = float(pb.sum(dtype=torch.float64)) - float(pb[0, 0, 0])
        cc_m, _, _ = _cc(cross, pa, pb, inside & measured, total_a, total_b)
        cc_w, saa_w, sbb_w = _cc(cross, pa, pb, inside & ~measured, total_a, total_b)
    if sbb_w <= EMPTY_FRACTION * total_b:
        ratio = float("nan")
    else:
        ratio = 0.0 if saa_w <= EMPTY_FRACTION * total_a else saa_w / sbb_w
    return {"cc_measured": cc_m, "cc_wedge": cc_w, "wedge_power_ratio": ratio}
