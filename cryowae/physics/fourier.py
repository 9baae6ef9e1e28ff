"""Fourier-space helpers shared by the physics, the metrics and the sampling code.

Conventions: volumes are (Z, Y, X); frequencies are in cycles per voxel, unshifted (FFT
order); "rfft layout" is the half spectrum of ``torch.fft.rfftn`` over the last three
axes, (Z, Y, X // 2 + 1). Every sum over an rfft spectrum that should equal the sum over
the full spectrum weights its columns by `hermitian_weights`; every per-shell quantity
uses the shells of `shell_index`. These are the only implementations of both in cryowae.
"""

from __future__ import annotations

import torch


def fourier_grid(shape: tuple[int, int, int], rfft: bool = False,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Frequencies of a (Z, Y, X) grid in cycles per voxel, unshifted (FFT order).

    Returns a tensor of shape (Z, Y, X, 3) (X -> X // 2 + 1 when `rfft`), the last axis
    ordered (kz, ky, kx).
    """
    z, y, x = (int(s) for s in shape)
    kz = torch.fft.fftfreq(z, device=device, dtype=dtype)
    ky = torch.fft.fftfreq(y, device=device, dtype=dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(x, device=device, dtype=dtype)
    return torch.stack(torch.meshgrid(kz, ky, kx, indexing="ij"), dim=-1)


def radial_frequency(shape: tuple[int, int, int], rfft: bool = False,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """|k| in cycles per voxel on a (Z, Y, X) grid (X halved when `rfft`)."""
    return fourier_grid(shape, rfft=rfft, device=device).norm(dim=-1)


def hermitian_weights(nx: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Multiplicity of each rfft column (last axis, length ``nx // 2 + 1``) in the full
    spectrum of a real signal with `nx` samples along that axis.

    1 for the zero-frequency column and, when `nx` is even, the Nyquist column (their
    Friedel mates are stored in the same column); 2 for every other column (its mate at
    -kx is not stored). Broadcasts over (Z, Y, X // 2 + 1) spectra and, for a 1D rfft,
    over (..., nx // 2 + 1) lines.
    """
    w = torch.full((int(nx) // 2 + 1,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if int(nx) % 2 == 0:
        w[-1] = 1.0
    return w


def nyquist_sphere(shape: tuple[int, int, int], rfft: bool = True,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask of the frequencies with 0 < |k| <= 0.5 cycles per voxel: up to
    Nyquist along every direction (the corners of the box beyond it left out) and
    without the DC term. (Z, Y, X // 2 + 1) when `rfft`, else (Z, Y, X)."""
    inside = radial_frequency(shape, rfft=rfft, device=device) <= 0.5
    inside[0, 0, 0] = False
    return inside


def shell_index(shape: tuple[int, int, int], device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, int]:
    """Radial shell of each rfft coefficient of a (Z, Y, X) volume, and the number of
    shells.

    Shells are ``1 / max(Z, Y, X)`` cycles per voxel wide (one Fourier voxel along the
    longest axis); a coefficient goes to the nearest shell, ``round(|k| max(shape))``.
    There are ``max(shape) // 2 + 1`` shells up to Nyquist (|k| <= 0.5); the corners of
    the box beyond it are counted in the last one.

    Returns
    -------
    idx, n_shells
        (Z, Y, X // 2 + 1) int64 shell numbers (shell 0 holds only DC) and the count.
    """
    n = max(int(s) for s in shape)
    r = radial_frequency(shape, rfft=True, device=device)
    n_shells = n // 2 + 1
    idx = torch.clamp(torch.round(r * n).long(), max=n_shells - 1)
    return idx, n_shells


def masked_fsc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Fourier shell correlation of two (Z, Y, X) volumes over a region of Fourier space.

    ``fsc(s) = Re sum A conj(B) / sqrt(sum |A|^2 sum |B|^2)``, each sum over the
    coefficients of shell `s` (`shell_index`) that lie in `mask`, with the full spectrum
    counted through `hermitian_weights`; sums in float64, one pass over the spectrum
    (``bincount``), so whole tomograms are cheap. A shell with no power in either
    volume (or none of its coefficients in the mask) gives 0.

    This is not `cryowae.metrics.fsc.fourier_shell_correlation`: that one is the plain,
    whole-spectrum FSC of torch-fourier-shell-correlation, with shells ``1 / min(shape)``
    wide and each coefficient split linearly between its two nearest shells, at a cost
    of one pass over the spectrum per shell. Restricting the sums to a region (the
    measured region of a tilt series, for the even/odd SNR of soft consistency) needs
    its own function; its shells are finer and never split.

    Parameters
    ----------
    a, b
        (Z, Y, X) real volumes of one shape, any float dtype.
    mask
        Optional rfft-layout (Z, Y, X // 2 + 1) mask; coefficients where it is > 0.5
        are counted. None: the whole spectrum.

    Returns
    -------
    torch.Tensor
        (n_shells,) float64 correlation per shell, shell 0 = DC.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"masked_fsc needs two (Z, Y, X) volumes of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    shape = tuple(int(s) for s in a.shape)
    fa = torch.fft.rfftn(a.to(torch.float32), dim=(-3, -2, -1))
    fb = torch.fft.rfftn(b.to(device=a.device, dtype=torch.float32), dim=(-3, -2, -1))
    w = hermitian_weights(shape[-1], torch.float64, a.device).expand(fa.shape).flatten()
    idx, n_shells = shell_index(shape, device=a.device)  # type: ignore[arg-type]
    ids = idx.flatten()
    cross = (fa * fb.conj()).real.double().flatten()
    pa = fa.abs().square().double().flatten()
    pb = fb.abs().square().double().flatten()
    if mask is not None:
        sel = (mask > 0.5).to(a.device).flatten()
        ids, w, cross, pa, pb = ids[sel], w[sel], cross[sel], pa[sel], pb[sel]
    s_ab = torch.bincount(ids, cross * w, minlength=n_shells)
    s_aa = torch.bincount(ids, pa * w, minlength=n_shells)
    s_bb = torch.bincount(ids, pb * w, minlength=n_shells)
    return s_ab / (s_aa * s_bb).sqrt().clamp_min(1e-30)


__all__ = ["fourier_grid", "hermitian_weights", "masked_fsc", "nyquist_sphere",
           "radial_frequency", "shell_index"]
