"""One call that scores a restored tomogram against its ground truth."""

from __future__ import annotations

import math
from typing import Any

from cryowae.errors import CryowaeInputError
from cryowae.metrics._common import as_geometry, as_tensor, check_finite_tensor, check_pair
from cryowae.metrics.correlation import pearson, psnr_db
from cryowae.metrics.fourier_regions import region_correlations
from cryowae.metrics.fsc import fsc_curve
from cryowae.physics.geometry import TiltGeometry


def evaluate_volumes(restored: Any, gt: Any, voxel_size: float,
                     geometry: TiltGeometry | None = None) -> dict[str, Any]:
    """Score `restored` against `gt` (both (Z, Y, X), same shape, any intensity scale).

    Parameters
    ----------
    restored, gt
        Volumes as torch tensors, numpy arrays or `cryowae.io.Volume`.
    voxel_size
        Angstrom per voxel (sets the FSC resolutions).
    geometry
        Acquisition tilt range (degrees) and axis, which define the missing-wedge region
        for `region_correlations`; default: -60..60 about Y.

    Returns
    -------
    dict
        ``pearson``: real-space correlation over all voxels.
        ``psnr_db``: PSNR (dB) after normalising both volumes to zero mean and unit
        standard deviation, with the normalised ground truth's range as the peak (so
        the intensity scale of different programs does not matter); ``inf`` when equal.
        ``fsc_0143_A``, ``fsc_05_A``: resolution (Angstrom) where the FSC first falls
        below 0.143 and 0.5 (``2 * voxel_size`` if it never does).
        ``cc_measured``, ``cc_wedge``, ``wedge_power_ratio``: Fourier agreement in the
        measured and the missing-wedge regions (see `region_correlations`).
        ``fsc``: the curve as ``[[resolution_A, fsc], ...]`` from low to high frequency.
        Also ``voxel_size_A``, ``nyquist_A``, ``shape`` (Z, Y, X), ``tilt_min``,
        ``tilt_max``, ``tilt_axis`` and ``tilt_source`` (where the geometry came from).
    """
    geo = as_geometry(geometry)
    if not (isinstance(voxel_size, int | float) and math.isfinite(voxel_size)
            and voxel_size > 0):
        raise CryowaeInputError(f"voxel size must be a positive number of Angstrom, got "
                                f"{voxel_size!r}")
    a, b = as_tensor(restored, "restored"), as_tensor(gt, "gt")
    check_pair(a, b)
    check_finite_tensor(a, "restored")
    check_finite_tensor(b, "gt")
    curve = fsc_curve(a, b, voxel_size)
    regions = region_correlations(a, b, geo)
    return {
        "pearson": pearson(a, b),
        "psnr_db": psnr_db(a, b),
        "fsc_0143_A": curve.resolution_at(0.143),
        "fsc_05_A": curve.resolution_at(0.5),
        "cc_measured": regions["cc_measured"],
        "cc_wedge": regions["cc_wedge"],
        "wedge_power_ratio": regions["wedge_power_ratio"],
        "voxel_size_A": float(voxel_size),
        "nyquist_A": 2.0 * float(voxel_size),
        "shape": [int(s) for s in a.shape],
        "tilt_min": geo.tilt_min,
        "tilt_max": geo.tilt_max,
        "tilt_axis": geo.axis,
        "tilt_source": geo.source,
        "fsc": curve.as_list(),
    }
