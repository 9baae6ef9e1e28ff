"""Sliced Wasserstein distance (p = 2) between two clouds of codes, in torch.

``SW_2^2(a, b) = mean over L random unit directions theta of W_2^2(theta.a, theta.b)``,
each 1D W_2^2 computed exactly between the two empirical (uniform-weight) measures:
both quantile functions are step functions, so the integral of their squared
difference over t in (0, 1) is a finite sum over the merged breakpoints
``{i / n} U {j / m}``. This handles unequal sample counts n != m exactly and reduces to
``mean((sort(x) - sort(y))^2)`` when n == m. Cost O(L (n + m) log(n + m)), memory
O(L (n + m)); gradients flow through ``torch.sort``.

Fresh directions are drawn on every call from the generator passed in (uniform on the
sphere: normalised Gaussian vectors).
"""

from __future__ import annotations

import torch

from cryowae.errors import CryowaeInputError


def random_directions(
    dim: int,
    n_projections: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Unit vectors uniform on the sphere, shape (dim, n_projections)."""
    gen_device = generator.device if generator is not None else None
    theta = torch.randn(dim, n_projections, generator=generator, dtype=dtype, device=gen_device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    return theta if device is None else theta.to(device)


def wasserstein_1d_squared(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Exact W_2^2 between uniform empirical measures, column by column.

    Args:
        xs: (n, L) projected samples (any order).
        ys: (m, L) projected samples.

    Returns:
        (L,) tensor of W_2^2 per column.
    """
    n, m = xs.shape[0], ys.shape[0]
    xs, _ = torch.sort(xs, dim=0)
    ys, _ = torch.sort(ys, dim=0)
    if n == m:
        return ((xs - ys) ** 2).mean(0)
    f64 = torch.float64
    # Breakpoints of both quantile functions, merged: t_k in (0, 1].
    t = torch.cat(
        [
            torch.arange(1, n + 1, dtype=f64, device=xs.device) / n,
            torch.arange(1, m + 1, dtype=f64, device=xs.device) / m,
        ]
    )
    t, _ = torch.sort(t)
    dt = torch.diff(t, prepend=t.new_zeros(1))
    mid = t - dt / 2  # midpoint of each interval, where both quantiles are constant
    ix = torch.clamp((mid * n).floor().long(), max=n - 1)
    iy = torch.clamp((mid * m).floor().long(), max=m - 1)
    diff2 = (xs[ix] - ys[iy]) ** 2  # (n + m, L)
    return (dt.to(xs.dtype).unsqueeze(1) * diff2).sum(0)


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_projections: int = 128,
    generator: torch.Generator | None = None,
    projections: torch.Tensor | None = None,
    squared: bool = True,
) -> torch.Tensor:
    """Sliced 2-Wasserstein between codes ``x`` (n, d) and ``y`` (m, d).

    Args:
        n_projections: number L of random directions (ignored if ``projections`` given).
        generator: source of the fresh directions (drawn on its device, then moved).
        projections: explicit (d, L) directions (unit columns), e.g. for a reference.
        squared: return SW_2^2 (default; smooth at 0, what training uses) or SW_2
            ``= sqrt(SW_2^2)`` (what POT's ``sliced_wasserstein_distance`` returns).

    Returns:
        scalar tensor.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise CryowaeInputError(
            f"sliced Wasserstein needs two (N, d) code tensors of the same d, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if projections is None:
        if int(n_projections) < 1:
            raise CryowaeInputError(
                f"number of projections must be positive, got {n_projections}"
            )
        projections = random_directions(
            x.shape[1], int(n_projections), generator, dtype=x.dtype, device=x.device
        )
    projections = projections.to(dtype=x.dtype, device=x.device)
    sw2 = wasserstein_1d_squared(x @ projections, y.to(x.dtype) @ projections).mean()
    return sw2 if squared else sw2.sqrt()


class SlicedWasserstein:
    """Callable ``(x (n, d), y (m, d)) -> SW_2^2`` with fresh directions per call.

    Args:
        n_projections: directions per call.
        generator: torch.Generator for the directions; if None one is created from
            ``seed`` so that runs are reproducible.
        seed: seed of the generator created when ``generator`` is None.
    """

    def __init__(
        self,
        n_projections: int = 128,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        if int(n_projections) < 1:
            raise CryowaeInputError(
                f"number of projections must be positive, got {n_projections}"
            )
        self.n_projections = int(n_projections)
        if generator is None:
            generator = torch.Generator().manual_seed(int(seed))
        self.generator = generator

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sliced_wasserstein(
            x, y, n_projections=self.n_projections, generator=self.generator
        )
