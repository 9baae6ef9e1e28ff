"""Kernel maximum mean discrepancy (MMD) between two clouds of latent codes.

The statistic is the one of the WAE paper's own code (tolstikhin/wae, ``mmd_penalty``
with kernel ``'IMQ'``), generalised to unequal sample counts::

    MMD^2 = 1/(n(n-1)) sum_{i != j} k(x_i, x_j)      (U-statistic, diagonal removed)
          + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)      (U-statistic, diagonal removed)
          - 2/(n m)    sum_{i, j}   k(x_i, y_j)      (mean over all n*m pairs)

with ``x`` the encoder's codes (n, d) and ``y`` a prior sample (m, d). For n == m this
is exactly the paper's formula. It is an unbiased estimate of MMD^2 and can therefore be
slightly negative when the two clouds come from the same distribution.

Kernels (``sigma`` is the prior's scale, ``d`` the code dimension, ``base = 2 d sigma^2``
the expected squared distance between two prior samples):

* ``"imq"`` (default), inverse multiquadratic, summed over scales s:
  ``k(x, y) = sum_s C_s / (C_s + |x - y|^2)`` with ``C_s = s * base`` and
  s in ``IMQ_SCALES = (0.1, 0.2, 0.5, 1, 2, 5, 10)`` as in the paper's code.
* ``"rbf"``, Gaussian: ``k(x, y) = sum_s exp(-|x - y|^2 / (2 sigma_s^2))`` with
  ``sigma_s^2 = s * base``. The default is the paper's single bandwidth,
  ``RBF_SCALES = (1.0,)`` i.e. ``sigma_k^2 = 2 d sigma^2`` (the bandwidth the paper
  reports as failing to penalise outliers); pass ``scales=IMQ_SCALES`` for the same
  multi-scale sum as the IMQ kernel. The RBF option exists to show why IMQ is the
  default: the Gaussian tail decays so fast that codes far from the prior get (almost)
  no gradient, while the IMQ gradient decays only like |x - y|^-3. Measured (d = 16,
  4 of 256 codes moved to 40 sigma): per-code gradient on the outliers 1.4e-6 with IMQ
  (0.7 % of the inliers'), 1.2e-14 with the single-bandwidth RBF; the multi-scale RBF
  sum reaches them through its widest bandwidth (1.3e-6).

Two implementations of the same number:

* `mmd_dense` builds the three kernel matrices (memory O(N^2): 96 MiB at 1,024 codes
  and 1.5 GiB at 4,096, d = 64, forward + backward); it is the reference.
* `mmd_blockwise` sums the kernel over tiles of ``block_size`` x ``block_size`` inside a
  custom `torch.autograd.Function` with a hand-written gradient, so nothing N x N is ever
  stored: memory is O(N d + block_size^2). Tile sums and gradients are accumulated in
  float64. The gradient is computed in the same pass over the tiles as the value (each
  tile's kernel is evaluated once) and only the (N, d) gradients are kept for
  ``backward``; when no input requires a gradient the pass computes the value only.
  The self terms visit only the upper triangle of tiles (the kernel is symmetric).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from cryowae.errors import CryowaeInputError

KERNELS = ("imq", "rbf")
IMQ_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
RBF_SCALES: tuple[float, ...] = (1.0,)


def kernel_constants(
    dim: int, scale: float = 1.0, kernel: str = "imq", scales: Sequence[float] | None = None
) -> tuple[float, ...]:
    """The per-scale constants of the kernel sum for codes of dimension ``dim``.

    IMQ: ``C_s = s * 2 * dim * scale**2``; RBF: ``sigma_s^2 = s * 2 * dim * scale**2``.
    ``scales`` defaults to `IMQ_SCALES` for IMQ and `RBF_SCALES` for RBF.
    """
    kernel = _check_kernel(kernel)
    if scales is None:
        scales = IMQ_SCALES if kernel == "imq" else RBF_SCALES
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise CryowaeInputError(f"kernel scales must be positive numbers, got {scales!r}")
    if not scale > 0:
        raise CryowaeInputError(f"the prior scale sigma must be positive, got {scale!r}")
    base = 2.0 * dim * float(scale) ** 2
    return tuple(s * base for s in scales)


def _check_kernel(kernel: str) -> str:
    k = str(kernel).lower()
    if k not in KERNELS:
        raise CryowaeInputError(
            f"unknown MMD kernel {kernel!r}: use one of {', '.join(KERNELS)}"
        )
    return k


def _check_codes(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise CryowaeInputError(
            f"MMD needs two (N, d) code tensors of the same d, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise CryowaeInputError(
            "MMD's U-statistic needs at least 2 codes on each side, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )


def _sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances (na, nb) by the norm expansion, clamped at 0 (as the WAE code)."""
    na = (a * a).sum(1, keepdim=True)
    nb = (b * b).sum(1, keepdim=True)
    return (na + nb.T - 2.0 * (a @ b.T)).clamp_min(0.0)


def _kernel_dense(d2: torch.Tensor, consts: tuple[float, ...], kernel: str) -> torch.Tensor:
    out = torch.zeros_like(d2)
    for c in consts:
        if kernel == "imq":
            out = out + c / (c + d2)
        else:
            out = out + torch.exp(-d2 / (2.0 * c))
    return out


def mmd_dense(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float = 1.0,
    kernel: str = "imq",
    scales: Sequence[float] | None = None,
) -> torch.Tensor:
    """Reference MMD^2 with dense kernel matrices (memory O((n + m)^2)).

    Args:
        x: codes (n, d), n >= 2.
        y: prior sample (m, d), m >= 2.
        scale: the prior's sigma; kernel constants are ``s * 2 d sigma^2``.
        kernel: ``"imq"`` or ``"rbf"``.
        scales: multipliers s (defaults: `IMQ_SCALES` / `RBF_SCALES`).

    Returns:
        scalar tensor (dtype of ``x``; the kernel sums are accumulated in float64),
        differentiable by ordinary autograd.
    """
    kernel = _check_kernel(kernel)
    _check_codes(x, y)
    consts = kernel_constants(x.shape[1], scale, kernel, scales)
    n, m = x.shape[0], y.shape[0]
    kxx = _kernel_dense(_sqdist(x, x), consts, kernel)
    kyy = _kernel_dense(_sqdist(y, y), consts, kernel)
    kxy = _kernel_dense(_sqdist(x, y), consts, kernel)
    offx = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)
    offy = 1.0 - torch.eye(m, dtype=y.dtype, device=y.device)
    f64 = torch.float64  # the sums of n^2 kernel values are accumulated in float64
    value = (
        (kxx * offx).sum(dtype=f64) / (n * (n - 1))
        + (kyy * offy).sum(dtype=f64) / (m * (m - 1))
        - 2.0 * kxy.sum(dtype=f64) / (n * m)
    )
    return value.to(x.dtype)


# ----------------------------------------------------------------------------- blockwise


def _tile(
    a: torch.Tensor,
    b: torch.Tensor,
    consts: tuple[float, ...],
    kernel: str,
    need_grad: bool,
    diagonal: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel sum over one tile (float64 scalar) and, if asked, W = dk/dD (na, nb),
    D = |a_i - b_j|^2.

    ``diagonal``: a and b are the same rows; the i == j entries are excluded.
    """
    d2 = torch.addmm(
        (a * a).sum(1, keepdim=True) + (b * b).sum(1).unsqueeze(0), a, b.T, alpha=-2.0
    ).clamp_min_(0.0)
    if diagonal:
        d2.diagonal().fill_(float("inf"))  # k(inf) = 0 and dk(inf) = 0 for both kernels
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    w = torch.zeros_like(d2) if need_grad else None
    buf = torch.empty_like(d2)
    for c in consts:
        if kernel == "imq":
            torch.add(d2, c, out=buf).reciprocal_()  # 1 / (C + D)
            total += c * buf.sum(dtype=torch.float64)
            if w is not None:
                w.addcmul_(buf, buf, value=-c)  # d/dD C/(C+D) = -C/(C+D)^2
        else:
            torch.mul(d2, -0.5 / c, out=buf).exp_()  # exp(-D / (2 s^2))
            total += buf.sum(dtype=torch.float64)
            if w is not None:
                w.add_(buf, alpha=-0.5 / c)
    return total, w


def _grad_a(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gradient of sum_ij k(|a_i - b_j|^2) w.r.t. a (na, d), given W = k'(D) (na, nb)."""
    return 2.0 * (a * w.sum(1, keepdim=True) - w @ b)


def _grad_b(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Gradient of sum_ij k(|a_i - b_j|^2) w.r.t. b (nb, d), given W = k'(D) (na, nb)."""
    return 2.0 * (b * w.sum(0).unsqueeze(1) - w.T @ a)


def _self_sum(
    x: torch.Tensor, consts: tuple[float, ...], kernel: str, block: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_{i != j} k(x_i, x_j) (float64 scalar) and its gradient (n, d) float64."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    grad = torch.zeros(x.shape, dtype=torch.float64, device=x.device) if need_grad else None
    for i0 in range(0, n, block):
        xi = x[i0 : i0 + block]
        for j0 in range(i0, n, block):
            xj = x[j0 : j0 + block]
            diag = i0 == j0
            s, w = _tile(xi, xj, consts, kernel, need_grad, diag)
            total += s if diag else 2.0 * s
            if grad is not None:
                gi = _grad_a(xi, xj, w)
                if diag:  # symmetric tile: the column-slot gradient equals the row one
                    grad[i0 : i0 + block] += 2.0 * gi
                else:  # the mirrored tile (j, i) gives the same pairs again
                    grad[i0 : i0 + block] += 2.0 * gi
                    grad[j0 : j0 + block] += 2.0 * _grad_b(xi, xj, w)
    return total, grad


def _cross_sum(
    x: torch.Tensor,
    y: torch.Tensor,
    consts: tuple[float, ...],
    kernel: str,
    block: int,
    need_x: bool,
    need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """sum_{i, j} k(x_i, y_j) (float64 scalar) and its gradients w.r.t. x and y."""
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    gx = torch.zeros(x.shape, dtype=torch.float64, device=x.device) if need_x else None
    gy = torch.zeros(y.shape, dtype=torch.float64, device=y.device) if need_y else None
    need_grad = need_x or need_y
    for i0 in range(0, x.shape[0], block):
        xi = x[i0 : i0 + block]
        for j0 in range(0, y.shape[0], block):
            yj = y[j0 : j0 + block]
            s, w = _tile(xi, yj, consts, kernel, need_grad, False)
            total += s
            if gx is not None:
                gx[i0 : i0 + block] += _grad_a(xi, yj, w)
            if gy is not None:
                gy[j0 : j0 + block] += _grad_b(xi, yj, w)
    return total, gx, gy


class _BlockwiseMMD(torch.autograd.Function):
    """MMD^2 over tiles; saves only the (n, d) and (m, d) gradients for backward."""

    @staticmethod
    def forward(ctx, x, y, consts, kernel, block):  # type: ignore[override]
        need_x, need_y = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        n, m = x.shape[0], y.shape[0]
        sxx, gxx = _self_sum(x, consts, kernel, block, need_x)
        syy, gyy = _self_sum(y, consts, kernel, block, need_y)
        sxy, gxy_x, gxy_y = _cross_sum(x, y, consts, kernel, block, need_x, need_y)
        value = sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2.0 * sxy / (n * m)
        if need_x or need_y:
            gx = gy = None
            if need_x:
                gx = (gxx / (n * (n - 1)) - 2.0 * gxy_x / (n * m)).to(x.dtype)
            if need_y:
                gy = (gyy / (m * (m - 1)) - 2.0 * gxy_y / (n * m)).to(y.dtype)
            ctx.save_for_backward(gx, gy)  # (n, d) and (m, d): linear memory
        return value.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        gx, gy = ctx.saved_tensors
        return (
            None if gx is None else grad_out * gx,
            None if gy is None else grad_out * gy,
            None,
            None,
            None,
        )


def mmd_blockwise(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float = 1.0,
    kernel: str = "imq",
    scales: Sequence[float] | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """MMD^2 with memory linear in the number of codes (same value as `mmd_dense`).

    Args:
        x: codes (n, d), n >= 2; may require grad.
        y: prior sample (m, d), m >= 2; may require grad.
        scale: the prior's sigma; kernel constants are ``s * 2 d sigma^2``.
        kernel: ``"imq"`` or ``"rbf"``.
        scales: multipliers s (defaults: `IMQ_SCALES` / `RBF_SCALES`).
        block_size: tile edge; peak extra memory is about 5 * block_size^2 elements.

    Returns:
        scalar tensor (dtype of ``x``); differentiable once w.r.t. ``x`` and ``y``.
    """
    kernel = _check_kernel(kernel)
    _check_codes(x, y)
    if int(block_size) < 1:
        raise CryowaeInputError(f"MMD block size must be a positive integer, got {block_size!r}")
    if y.dtype != x.dtype or y.device != x.device:
        y = y.to(dtype=x.dtype, device=x.device)
    consts = kernel_constants(x.shape[1], scale, kernel, scales)
    return _BlockwiseMMD.apply(x.contiguous(), y.contiguous(), consts, kernel, int(block_size))


def mmd(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    scale: float = 1.0,
    kernel: str = "imq",
    scales: Sequence[float] | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """MMD^2 of codes ``x`` (n, d) against prior sample ``y`` (m, d): `mmd_blockwise`.

    The blockwise implementation is the default at every size: at 1,024 codes it was
    also faster than `mmd_dense` (0.27 s vs 0.86 s forward + backward, 22 vs 96 MiB).
    """
    return mmd_blockwise(x, y, scale=scale, kernel=kernel, scales=scales, block_size=block_size)
