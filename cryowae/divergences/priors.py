"""Latent priors the aggregated posterior is pulled towards.

Both priors sample (n, dim) float tensors and expose ``scale`` (sigma), the length
scale the divergences use (the IMQ/RBF kernel constants ``s * 2 d sigma^2``, the
Sinkhorn blur, the prefers-prior check's contraction and shift).
"""

from __future__ import annotations

import torch

from cryowae.errors import CryowaeInputError


def _check_n(n: int) -> int:
    n = int(n)
    if n < 1:
        raise CryowaeInputError(f"number of prior samples must be positive, got {n}")
    return n


class GaussianPrior:
    """Isotropic Gaussian N(0, sigma^2 I) in ``dim`` dimensions (the WAE default)."""

    def __init__(self, dim: int, sigma: float = 1.0) -> None:
        if int(dim) < 1:
            raise CryowaeInputError(f"latent dimension must be positive, got {dim}")
        if not float(sigma) > 0:
            raise CryowaeInputError(f"prior sigma must be positive, got {sigma}")
        self.dim = int(dim)
        self.sigma = float(sigma)

    @property
    def scale(self) -> float:
        """sigma, the per-coordinate standard deviation."""
        return self.sigma

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """n samples, shape (n, dim). Drawn on the generator's device, then moved."""
        n = _check_n(n)
        gen_device = generator.device if generator is not None else None
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=gen_device)
        z = z * self.sigma
        return z if device is None else z.to(device)

    def __repr__(self) -> str:
        return f"GaussianPrior(dim={self.dim}, sigma={self.sigma:g})"


class ReferencePrior:
    """Empirical prior: the codes of clean reference volumes, resampled with replacement.

    The trainer encodes randomly rotated reference maps and hands the codes (K, dim) in.
    ``jitter`` adds N(0, (jitter * scale)^2 I) noise to each draw so that a small set of
    reference codes becomes a smooth distribution (0 = plain bootstrap).
    ``scale`` is the root-mean per-coordinate standard deviation of the codes,
    ``sqrt(trace(Cov) / dim)``, i.e. the sigma of an isotropic Gaussian with the same
    total variance.
    """

    def __init__(self, codes: torch.Tensor, jitter: float = 0.0) -> None:
        if codes.ndim != 2 or codes.shape[0] < 2:
            raise CryowaeInputError(
                f"reference prior needs codes of shape (K >= 2, dim), got {tuple(codes.shape)}"
            )
        if not torch.isfinite(codes).all():
            raise CryowaeInputError("reference prior codes contain NaN or infinite values")
        if float(jitter) < 0:
            raise CryowaeInputError(f"reference prior jitter must be >= 0, got {jitter}")
        self.codes = codes.detach().clone()
        self.jitter = float(jitter)
        self.dim = int(codes.shape[1])
        var = self.codes.double().var(dim=0, unbiased=True).mean()
        self._scale = float(var.sqrt())
        if not self._scale > 0:
            raise CryowaeInputError("reference prior codes are all identical (zero spread)")

    @classmethod
    def from_codes(cls, codes: torch.Tensor, jitter: float = 0.0) -> ReferencePrior:
        """Build the prior from reference codes (K, dim); see the class docstring."""
        return cls(codes, jitter=jitter)

    @property
    def scale(self) -> float:
        """sqrt(trace(Cov(codes)) / dim)."""
        return self._scale

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """n codes drawn with replacement (plus jitter), shape (n, dim)."""
        n = _check_n(n)
        gen_device = generator.device if generator is not None else self.codes.device
        idx = torch.randint(
            0, self.codes.shape[0], (n,), generator=generator, device=gen_device
        )
        z = self.codes.to(gen_device)[idx].to(dtype)
        if self.jitter > 0:
            z = z + self.jitter * self._scale * torch.randn(
                z.shape, generator=generator, dtype=dtype, device=gen_device
            )
        return z if device is None else z.to(device)

    def __repr__(self) -> str:
        return (
            f"ReferencePrior(K={self.codes.shape[0]}, dim={self.dim}, "
            f"scale={self._scale:.3g}, jitter={self.jitter:g})"
        )


Prior = GaussianPrior | ReferencePrior
