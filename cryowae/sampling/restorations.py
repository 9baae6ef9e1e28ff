"""The restoration a family is centred on, as a function of an array, shared by the
steps of `cryowae.sampling.files.sample_file` that restore crops of the data.

The spread calibration (`cryowae.sampling.recalibrate.estimate_factors`: SURE of the
central crop) and the self-check (`cryowae.sampling.selfcheck.self_check`: SURE of the
same crop, with another probe) both restore the unperturbed central crop; the local
step's fit and the self-check restore the data with a second wedge removed. A
`SharedRestoration` restores each distinct input once: the later step gets the stored
result, bit for bit what the restoration would give again (the network in eval mode is
deterministic on one device). Inputs are told apart by their shape, dtype and a BLAKE2b
digest of their bytes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

#: restorations kept (crops of at most 128^3 float32: 8 MiB each)
KEEP = 4


class SharedRestoration:
    """``restore(x)`` of a (Z, Y, X) array, each distinct input restored once.

    Parameters
    ----------
    restore
        The restoration as a function of a float32 (Z, Y, X) array (e.g.
        ``functools.partial(restore_array, restorer, ...)``).
    keep
        How many results are kept, the least recently used dropped first.

    Attributes
    ----------
    calls, hits
        Restorations asked for, and those answered from a kept result.
    """

    def __init__(self, restore: Callable[[np.ndarray], Any], keep: int = KEEP) -> None:
        self.restore, self.keep = restore, int(keep)
        self._kept: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
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
            self._kept.move_to_end(k)
            return self._kept[k].copy()  # callers may write into what they get
        out = np.array(self.restore(a), dtype=np.float32)
        self._kept[k] = out
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)
        return out.copy()


__all__ = ["KEEP", "SharedRestoration"]
