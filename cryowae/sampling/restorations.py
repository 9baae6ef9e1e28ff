"""The restoration a family is centred on, as a function of an array, shared by the
steps of `cryowae.sampling.files.sample_file` that restore crops of the data.

The spread calibration (`cryowae.sampling.recalibrate.estimate_factors`: SURE of the
central crop) and the self-check (`cryowae.sampling.selfcheck.self_check`: SURE of the
same crop, with another probe) both restore the unperturbed central crop. A
`SharedRestoration` keeps the restorations of the inputs it is told to keep (that crop)
and restores them once: the later step gets the stored result, bit for bit what the
restoration would give again (the network in eval mode is deterministic on one device).
Other inputs are restored every time and not kept, so memory holds the kept inputs'
restorations only. Inputs are told apart by their shape, dtype and a BLAKE2b digest of
their bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


class SharedRestoration:
    """``restore(x)`` of a (Z, Y, X) array, the inputs in `keep` restored once.

    Parameters
    ----------
    restore
        The restoration as a function of a float32 (Z, Y, X) array (e.g.
        ``functools.partial(restore_array, restorer, ...)``).
    keep
        The inputs whose restorations are kept once computed (compared as float32).

    Attributes
    ----------
    calls, hits
        Restorations asked for, and those answered from a kept result.
    """

    def __init__(self, restore: Callable[[np.ndarray], Any],
                 keep: Sequence[Any] = ()) -> None:
        self.restore = restore
        self._wanted = {self.key(np.asarray(x, dtype=np.float32)) for x in keep}
        self._kept: dict[tuple[Any, ...], np.ndarray] = {}
        self.calls = self.hits = 0

    @staticmethod
    def key(x: np.ndarray) -> tuple[Any, ...]:
        """Shape, dtype and digest of the bytes of `x`."""
        a = np.ascontiguousarray(x)
        return (a.shape, a.dtype.str, hashlib.blake2b(a.data, digest_size=20).digest())

    def __call__(self, x: Any) -> np.ndarray:
        a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        k = self.key(a)
        self.calls += 1
        if k in self._kept:
            self.hits += 1
            return self._kept[k].copy()  # callers may write into what they get
        out = np.array(self.restore(a), dtype=np.float32)
        if k in self._wanted:
            self._kept[k] = out.copy()
        return out


__all__ = ["SharedRestoration"]
