"""`CodeBank`: a FIFO memory bank of recent detached codes.

One minibatch of subtomograms gives a few dozen codes, far too few to estimate the
aggregated posterior in 8-256 dimensions. The bank keeps the last ``capacity`` codes
(detached, so no graph is kept) and the penalty compares the concatenation
``[z_batch (with grad), bank (detached)]`` with a prior sample of the same size, so
the aggregate is estimated from up to ``batch + capacity`` codes while gradients still
reach only the current batch. The banked codes come from slightly older encoder
weights; keep the capacity to a few hundred steps' worth.

Typical step::

    loss = recon + lam * bank.penalty(z)      # z (B, d) with grad
    loss.backward(); opt.step()
    bank.push(z)                              # after the step
"""

from __future__ import annotations

from typing import Any

import torch

from cryowae.divergences.priors import Prior
from cryowae.errors import CryowaeInputError


class CodeBank:
    """FIFO queue of up to ``capacity`` detached codes (rows of a (capacity, d) buffer).

    Args:
        divergence: callable ``(z_q (n, d), z_p (n, d)) -> scalar`` (a `LatentDivergence`).
        prior: has ``.sample(n, generator, device)``.
        capacity: number of banked codes kept (oldest dropped first).
        generator: torch.Generator for the prior samples (None: global RNG).
    """

    def __init__(
        self,
        divergence: Any,
        prior: Prior,
        capacity: int = 4096,
        generator: torch.Generator | None = None,
    ) -> None:
        if int(capacity) < 0:
            raise CryowaeInputError(f"code bank capacity must be >= 0, got {capacity}")
        self.divergence = divergence
        self.prior = prior
        self.capacity = int(capacity)
        self.generator = generator
        self._buf: torch.Tensor | None = None  # (capacity, d), allocated at first push
        self._next = 0  # row the next code is written to
        self._count = 0  # number of valid rows

    def __len__(self) -> int:
        return self._count

    def codes(self) -> torch.Tensor:
        """The banked codes (len, d), oldest first; an empty (0, 0) tensor if none."""
        if self._buf is None or self._count == 0:
            return torch.empty(0, 0)
        if self._count < self.capacity:
            return self._buf[: self._count]
        return torch.cat([self._buf[self._next :], self._buf[: self._next]])

    def push(self, z_batch: torch.Tensor) -> None:
        """Append detached codes (B, d); the oldest are overwritten once full."""
        if z_batch.ndim != 2:
            raise CryowaeInputError(f"codes must be (B, d), got {tuple(z_batch.shape)}")
        if self.capacity == 0:
            return
        z = z_batch.detach()
        if self._buf is None:
            self._buf = torch.zeros(
                self.capacity, z.shape[1], dtype=z.dtype, device=z.device
            )
        elif z.shape[1] != self._buf.shape[1]:
            raise CryowaeInputError(
                f"code dimension {z.shape[1]} differs from the bank's {self._buf.shape[1]}"
            )
        z = z.to(dtype=self._buf.dtype, device=self._buf.device)
        if z.shape[0] >= self.capacity:  # only the newest `capacity` survive
            self._buf.copy_(z[-self.capacity :])
            self._next = 0
            self._count = self.capacity
            return
        end = self._next + z.shape[0]
        if end <= self.capacity:
            self._buf[self._next : end] = z
        else:
            k = self.capacity - self._next
            self._buf[self._next :] = z[:k]
            self._buf[: end - self.capacity] = z[k:]
        self._next = end % self.capacity
        self._count = min(self.capacity, self._count + z.shape[0])

    def aggregate(self, z_batch: torch.Tensor) -> torch.Tensor:
        """``[z_batch (with grad), banked codes (detached)]``, shape (B + len, d)."""
        if self._count == 0:
            return z_batch
        bank = self.codes().to(dtype=z_batch.dtype, device=z_batch.device)
        return torch.cat([z_batch, bank], dim=0)

    def penalty(
        self, z_batch: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Divergence of the aggregate (B + len, d) against a prior sample of that size."""
        zq = self.aggregate(z_batch)
        zp = self.prior.sample(
            zq.shape[0],
            generator=generator if generator is not None else self.generator,
            device=zq.device,
        ).to(zq.dtype)
        return self.divergence(zq, zp)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: the codes oldest first (CPU), and the capacity."""
        codes = self.codes().detach().cpu().clone()
        return {"capacity": self.capacity, "codes": codes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` (the capacity of this bank is kept)."""
        self._buf = None
        self._next = 0
        self._count = 0
        codes = state.get("codes")
        if codes is not None and codes.numel() > 0:
            self.push(codes)

    def to(self, device: torch.device | str) -> CodeBank:
        """Move the banked codes to ``device``; returns self."""
        if self._buf is not None:
            self._buf = self._buf.to(device)
        return self
