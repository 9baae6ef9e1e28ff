"""Metrics of restoration quality: real-space correlation and PSNR, FSC, agreement in the
measured and missing-wedge regions of Fourier space, and calibration of posterior
samples. `evaluate_volumes` runs them all (what `cryowae evaluate` prints)."""

from cryowae.metrics.calibration import interval_coverage
from cryowae.metrics.correlation import normalise, pearson, psnr_db
from cryowae.metrics.fourier_regions import region_correlations
from cryowae.metrics.fsc import FSCCurve, fourier_shell_correlation, fsc_curve, fsc_resolution
from cryowae.metrics.report import evaluate_volumes

__all__ = [
    "FSCCurve", "evaluate_volumes", "fourier_shell_correlation", "fsc_curve", "fsc_resolution",
    "interval_coverage", "normalise", "pearson", "psnr_db", "region_correlations",
]
