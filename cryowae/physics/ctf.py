"""Contrast transfer function of the microscope, through `torch-ctf`.

Images are (..., Y, X) with square pixels of `voxel_size` Angstrom. Defocus is in
micrometres (positive = underfocus), voltage in kV, spherical aberration in mm,
amplitude contrast a fraction in [0, 1).

Sign convention: `torch_ctf.calculate_ctf_2d` returns
``sqrt(1 - A^2) sin(chi) + A cos(chi)``, which is +A at zero frequency. Under the weak
phase approximation the recorded intensity of an object with phase shift ``phi`` is
``1 - 2 (CTF * phi)``, so protein (positive potential) is dark at underfocus, as in
real micrographs. Phase flipping multiplies by the sign of the CTF and leaves
``2 |CTF| * phi``: positive density for protein again.

The CTF is the same over the whole image (the defocus gradient across a tilted image
is ignored), and images are mirror-padded before filtering so that the CTF's
delocalisation does not wrap signal from one edge to the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# physical constants (CODATA)
_H = 6.62607015e-34  # J s
_M0 = 9.1093837015e-31  # kg
_E = 1.602176634e-19  # C
_C = 299792458.0  # m / s


@dataclass(frozen=True)
class CTFParams:
    """Microscope parameters: defocus (um, positive underfocus), voltage (kV),
    spherical aberration cs (mm), amplitude contrast (fraction)."""

    defocus: float = 3.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Angstrom (0.0197 A at 300 kV)."""
    v = voltage_kv * 1e3
    lam = _H / math.sqrt(2 * _M0 * _E * v * (1 + _E * v / (2 * _M0 * _C**2)))
    return lam * 1e10


def interaction_constant(voltage_kv: float) -> float:
    """Interaction constant sigma in rad / (V Angstrom): the phase shift of the electron
    wave per volt of potential per Angstrom of path (6.5e-4 at 300 kV; Kirkland eq. 5.6).
    """
    lam = electron_wavelength(voltage_kv)
    v = voltage_kv * 1e3
    mc2 = _M0 * _C**2 / _E  # rest energy in eV
    return 2 * math.pi / (lam * v) * (mc2 + v) / (2 * mc2 + v)


def ctf_2d(shape: tuple[int, int], voxel_size: float, params: CTFParams,
           device: torch.device | str | None = None) -> torch.Tensor:
    """The CTF (torch-ctf sign convention, see the module docstring) of an image of
    `shape` (Y, X) with pixels of `voxel_size` A, in `torch.fft.rfft2` layout
    (Y, X // 2 + 1), float32."""
    from torch_ctf import calculate_ctf_2d

    ctf = calculate_ctf_2d(
        defocus=torch.tensor(float(params.defocus), device=device),
        astigmatism=0.0, astigmatism_angle=0.0, voltage=float(params.voltage),
        spherical_aberration=float(params.cs),
        amplitude_contrast=float(params.amplitude_contrast), phase_shift=0.0,
        pixel_size=float(voxel_size), image_shape=(int(shape[0]), int(shape[1])),
        rfft=True, fftshift=False,
    )
    return ctf.reshape(int(shape[0]), int(shape[1]) // 2 + 1).to(torch.float32)


def _default_pad(shape: tuple[int, int]) -> int:
    return max(1, min(max(8, min(shape) // 8), min(shape) - 1))


def _filter(images: torch.Tensor, voxel_size: float, params: CTFParams, pad: int | None,
            fn) -> torch.Tensor:
    y, x = images.shape[-2:]
    p = _default_pad((y, x)) if pad is None else int(pad)
    lead = images.shape[:-2]
    im = images.reshape(-1, 1, y, x).to(torch.float32)
    if p > 0:
        im = F.pad(im, (p, p, p, p), mode="reflect")
    ctf = ctf_2d(im.shape[-2:], voxel_size, params, device=images.device)
    out = torch.fft.irfft2(torch.fft.rfft2(im) * fn(ctf), s=im.shape[-2:])
    if p > 0:
        out = out[..., p:p + y, p:p + x]
    return out.reshape(*lead, y, x)


def apply_ctf(images: torch.Tensor, voxel_size: float, params: CTFParams,
              pad: int | None = None) -> torch.Tensor:
    """Convolve (..., Y, X) images with the CTF's point-spread function (multiply
    their spectra by the CTF). `pad`: mirror padding in pixels (default max(8, n/8))."""
    return _filter(images, voxel_size, params, pad, lambda c: c)


def phase_flip(images: torch.Tensor, voxel_size: float, params: CTFParams,
               pad: int | None = None) -> torch.Tensor:
    """CTF correction by phase flipping: multiply the spectra of (..., Y, X) images by
    the sign of the CTF (zeros of the CTF count as positive)."""
    return _filter(images, voxel_size, params, pad,
                   lambda c: torch.where(c < 0, -1.0, 1.0).to(c.dtype))
