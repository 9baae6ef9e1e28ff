"""Settings of a posterior family, one frozen dataclass per concern, validated when made:
how samples are drawn (`SamplerSettings`), how the spread is calibrated and checked
(`CalibrationSettings`), how the family is stored (`StorageSettings`). The CLI and the
napari plugin build these and pass them to `sample_file` / `sample_array`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryowae.errors import CryowaeInputError
from cryowae.sampling.consistency import CONSISTENCY
from cryowae.sampling.recalibrate import SPREAD_CALIBRATIONS
from cryowae.sampling.samplers import DEFAULT_SAMPLER, SAMPLERS
from cryowae.tiling.settings import TileSettings

#: the choices of ``--sample-dtype``: float16 halves the samples' size on disk
SAMPLE_DTYPES = ("float16", "float32")
#: the choices of ``--compression`` of samples.zarr
COMPRESSIONS = ("zstd", "none")
#: float16 keeps about 11 significant bits: the samples are stored as float16 only when
#: its rounding at |tomogram mean| + 5 std stays below this fraction of the std
FLOAT16_TOLERANCE = 0.005
#: largest finite float16
FLOAT16_MAX = 65504.0


def _whole(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CryowaeInputError(f"--{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SamplerSettings:
    """How the samples are drawn.

    Attributes
    ----------
    n_samples
        Family size N (``ensemble``: one sample per model; ``rotations``: at most 24).
    sampler
        ``prior`` (default), ``rotations`` or ``ensemble`` (`cryowae.sampling.samplers`).
    tiles
        Tile edge, overlap and batch size of the engine; tile starts are aligned to the
        model's multiple.
    seed
        Sample s is drawn from the generator of (seed, s): the same on every run.
    group
        Samples per engine pass (``prior``); None: chosen from the slab buffer
        (`cryowae.sampling.family.plan_family`).
    amp
        bf16 autocast of the networks (`cryowae.precision.amp_active`): None = the
        device's default, True = on where the device supports it, False = float32.
    channels_last
        ``prior``: the branch's weights in ``channels_last_3d`` (converted in place: the
        same numbers in another memory order), so its convolutions, which decode every
        sample, take the layout's kernels. The samples differ from the default layout's
        by float32 rounding (sums in another order).
    """

    n_samples: int = 16
    sampler: str = DEFAULT_SAMPLER
    tiles: TileSettings = field(default_factory=TileSettings)
    seed: int = 0
    group: int | None = None
    amp: bool | None = None
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise CryowaeInputError(f"unknown --sampler {self.sampler!r}: choose from "
                                    f"{', '.join(SAMPLERS)}")
        object.__setattr__(self, "n_samples", _whole("n", self.n_samples, 1))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise CryowaeInputError(f"--seed must be a whole number, got {self.seed!r}")
        if self.group is not None:
            object.__setattr__(self, "group", _whole("group", self.group, 1))
        if not isinstance(self.tiles, TileSettings):
            raise CryowaeInputError("tiles must be a TileSettings")
        if self.amp not in (None, True, False):
            raise CryowaeInputError(f"amp must be None, True or False, got {self.amp!r}")
        if not isinstance(self.channels_last, bool):
            raise CryowaeInputError(f"channels_last must be True or False, got "
                                    f"{self.channels_last!r}")


@dataclass(frozen=True)
class CalibrationSettings:
    """The spread calibration and the data-consistency check of a family.

    Attributes
    ----------
    spread
        ``auto`` (``halves`` with the even/odd halves, else ``data``), ``halves``,
        ``data`` or ``none`` (`cryowae.sampling.recalibrate`).
    consistency
        ``check`` (residual against the data over the noise, per shell) or ``none``.
    """

    spread: str = "auto"
    consistency: str = "check"

    def __post_init__(self) -> None:
        if self.spread not in SPREAD_CALIBRATIONS:
            raise CryowaeInputError(f"unknown spread calibration {self.spread!r}: use "
                                    f"{', '.join(SPREAD_CALIBRATIONS)}")
        if self.consistency not in CONSISTENCY:
            raise CryowaeInputError(f"unknown --consistency {self.consistency!r}: choose from "
                                    f"{', '.join(CONSISTENCY)} (the measured region is "
                                    "never overwritten)")


@dataclass(frozen=True)
class StorageSettings:
    """How a family is written to disk.

    Attributes
    ----------
    sample_dtype
        ``float16`` (default) or ``float32``: the dtype of samples.zarr. The moments and
        the calibration are computed from the float32 samples, never the rounded ones.
    keep
        Samples stored in samples.zarr (the first `keep`); None: all N. The mean, std,
        calibration and check always use all N.
    compression
        ``zstd`` (default) or ``none``: the chunk codec of samples.zarr.
    chunk_z, chunk_yx
        Chunk of samples.zarr: one sample, `chunk_z` slices, `chunk_yx` x `chunk_yx`
        voxels (napari reads a few slices per chunk while scrolling through Z).
    pyramid
        Downsampled levels of samples.zarr (2x mean pooling, up to 3 levels) besides the
        full-resolution one.
    std_dtype
        ``float16`` (default, MRC mode 12) or ``float32``: the dtype of std.mrc.
    overwrite
        Replace an existing output directory.
    """

    sample_dtype: str = "float16"
    keep: int | None = None
    compression: str = "zstd"
    chunk_z: int = 4
    chunk_yx: int = 256
    pyramid: bool = False
    std_dtype: str = "float16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name, value in (("sample-dtype", self.sample_dtype),
                            ("std-dtype", self.std_dtype)):
            if value not in SAMPLE_DTYPES:
                raise CryowaeInputError(f"--{name} {value!r}: choose from "
                                        f"{', '.join(SAMPLE_DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise CryowaeInputError(f"--compression {self.compression!r}: choose from "
                                    f"{', '.join(COMPRESSIONS)}")
        if self.keep is not None:
            object.__setattr__(self, "keep", _whole("keep", self.keep, 1))
        object.__setattr__(self, "chunk_z", _whole("chunk-z", self.chunk_z, 1))
        object.__setattr__(self, "chunk_yx", _whole("chunk-yx", self.chunk_yx, 1))

    def kept(self, n_samples: int) -> int:
        """Samples stored of a family of `n_samples` (`keep` may not exceed it)."""
        if self.keep is not None and self.keep > n_samples:
            raise CryowaeInputError(f"--keep {self.keep} is more than the family's "
                                    f"{n_samples} samples")
        return n_samples if self.keep is None else self.keep

    def chunks(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Chunk shape of samples.zarr for a (Z, Y, X) tomogram of `shape`."""
        z, y, x = shape
        return (1, min(self.chunk_z, z), min(self.chunk_yx, y), min(self.chunk_yx, x))

    def describe(self) -> dict[str, Any]:
        return {"sample_dtype": self.sample_dtype, "keep": self.keep,
                "compression": self.compression, "chunks_zyx": [self.chunk_z,
                                                                 self.chunk_yx,
                                                                 self.chunk_yx],
                "pyramid": self.pyramid, "std_dtype": self.std_dtype}


def float16_fits(norm: tuple[float, float]) -> bool:
    """Whether float16 holds a tomogram of global (mean, std) `norm` to within
    `FLOAT16_TOLERANCE` of its std at |mean| + 5 std (half a float16 step there is
    2^-11 of the value) without overflow."""
    mean, std = float(norm[0]), float(norm[1])
    top = abs(mean) + 5.0 * std
    return top < FLOAT16_MAX and top * 2.0 ** -11 <= FLOAT16_TOLERANCE * std


__all__ = ["COMPRESSIONS", "SAMPLE_DTYPES", "CalibrationSettings", "SamplerSettings",
           "StorageSettings", "float16_fits"]
