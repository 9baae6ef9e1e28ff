"""Agreement in the measured and in the missing-wedge region of Fourier space.

A restorer can reproduce the measured frequencies perfectly and still leave the missing
wedge empty (or fill it with anything). These metrics score the two regions apart:

    cc(R) = Re( sum_{k in R} A(k) conj(B(k)) ) / sqrt( sum_R |A(k)|^2  sum_R |B(k)|^2 )

where A and B are the unnormalised DFTs of the restored and ground-truth volumes. The
regions are those of the tilt geometry's missing-wedge mask
(`cryowae.physics.geometry.TiltGeometry.wedge_mask`; measured: mask = 1; wedge: mask =
0), both restricted to `cryowae.physics.fourier.nyquist_sphere` (0 < |k| <= 0.5 cycles
per voxel). The sums run over the full spectrum: the half spectrum of ``rfftn`` is
weighted by `cryowae.physics.fourier.hermitian_weights`, so results equal those of a
full FFT. A region where either volume has no energy (less than `EMPTY_FRACTION` of its
total non-DC power, i.e. only round-off) gives 0.
"""

from __future__ import annotations

from typing import Any

import torch

from cryowae.metrics._common import as_geometry, as_tensor, check_pair
from cryowae.physics.fourier import hermitian_weights, nyquist_sphere
from cryowae.physics.geometry import TiltGeometry

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


def region_correlations(restored: Any, gt: Any, geometry: TiltGeometry | None = None
                        ) -> dict[str, float]:
    """Fourier correlation of `restored` with `gt` inside and outside the missing wedge.

    Parameters
    ----------
    restored, gt
        (Z, Y, X) volumes of one shape (torch, numpy or `Volume`).
    geometry
        Tilt range (degrees) and axis of the acquisition; default: -60..60 about Y.

    Returns
    -------
    dict
        ``cc_measured`` and ``cc_wedge`` (in [-1, 1], 0 for a region without energy in
        either volume) and ``wedge_power_ratio``: power of `restored` in the wedge over
        that of `gt` (0 when the restoration leaves the wedge empty; nan when the ground
        truth has no power there).
    """
    geo = as_geometry(geometry)
    a, b = as_tensor(restored, "restored"), as_tensor(gt, "gt")
    check_pair(a, b)
    shape = tuple(int(s) for s in a.shape)
    with torch.no_grad():
        fa = torch.fft.rfftn(a, dim=(-3, -2, -1))
        fb = torch.fft.rfftn(b.to(a.device), dim=(-3, -2, -1))
        w = hermitian_weights(shape[-1], torch.float32, a.device)
        cross = (fa * fb.conj()).real * w  # float32 storage, float64 sums
        pa = fa.abs().square() * w
        pb = fb.abs().square() * w
        del fa, fb
        inside = nyquist_sphere(shape, device=a.device)  # type: ignore[arg-type]
        measured = geo.wedge_mask(shape, rfft=True, device=a.device) > 0.5
        total_a = float(pa.sum(dtype=torch.float64)) - float(pa[0, 0, 0])
        total_b = float(pb.sum(dtype=torch.float64)) - float(pb[0, 0, 0])
        cc_m, _, _ = _cc(cross, pa, pb, inside & measured, total_a, total_b)
        cc_w, saa_w, sbb_w = _cc(cross, pa, pb, inside & ~measured, total_a, total_b)
    if sbb_w <= EMPTY_FRACTION * total_b:
        ratio = float("nan")
    else:
        ratio = 0.0 if saa_w <= EMPTY_FRACTION * total_a else saa_w / sbb_w
    return {"cc_measured": cc_m, "cc_wedge": cc_w, "wedge_power_ratio": ratio}
