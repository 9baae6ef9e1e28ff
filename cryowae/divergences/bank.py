"""Memory bank for latent matching: a FIFO store and the aggregate it feeds the penalty.

One minibatch of subtomograms gives a few codes, far too few to estimate the aggregated
posterior in 8-256 dimensions. `CodeBank` keeps the last ``capacity`` rows (detached;
the trainer stores pooled encoder features and maps them through the current latent
head, see `cryowae.training.latent`), and `aggregate_with_bank` builds the sample the
divergence compares with the prior: ``[z_batch (with grad), banked codes]``, the banked
codes re-centred on the batch mean. Why re-centred: banked codes come from older
weights and lag behind; an uncentred, detached bank repels each new batch away from
where the codes were and the codes run away (docs/benchmarks.md, "what the memory bank
does"). Centred, the bank contributes only the spread of the aggregate.

Typical step::

    z_all = aggregate_with_bank(z, head(bank.codes()))
    loss = recon + lam * divergence(z_all, prior.sample(len(z_all)))
    loss.backward(); opt.step()
    bank.push(features.detach())              # after the step
"""

from __future__ import annotations

from typing import Any

import torch

from cryowae.errors import CryowaeInputError


def aggregate_with_bank(z_batch: torch.Tensor, banked: torch.Tensor,
                        center: bool = True) -> torch.Tensor:
    """``[z_batch, banked]`` (B + N, d): the batch codes (B, d) keep their graph; the
    banked codes (N, d) are shifted so that their mean equals the batch mean (detached)
    when `center` is set. An empty bank returns `z_batch`."""
    if banked.numel() == 0:
        return z_batch
    banked = banked.to(dtype=z_batch.dtype, device=z_batch.device)
    if center:
        banked = banked - banked.mean(0, keepdim=True) + z_batch.detach().mean(0, keepdim=True)
    return torch.cat([z_batch, banked], dim=0)


class CodeBank:
    """FIFO queue of up to ``capacity`` detached rows (of a (capacity, d) buffer): codes,
    or the pooled features the trainer maps to codes.

    Args:
        capacity: number of rows kept (oldest dropped first); 0 keeps nothing.
    """

    def __init__(self, capacity: int = 4096) -> None:
        if int(capacity) < 0:
            raise CryowaeInputError(f"code bank capacity must be >= 0, got {capacity}")
        self.capacity = int(capacity)
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
