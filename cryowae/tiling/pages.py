"""Keeping memory-mapped inputs and outputs from staying resident during a tiled pass.

Reading or writing a memory map leaves its pages counted in the process's resident size
until the kernel needs them back: restoring a 10 GB tomogram would show 20 GB resident.
The tile engine hands the pages back as it moves on, so the resident size stays near one
slab. The data stays in the file (and the page cache); a later access reads it back.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np


def mmap_of(arr: Any) -> mmap.mmap | None:
    """The shared `mmap.mmap` behind a numpy memmap (or a view of one), else None.

    Copy-on-write maps (mode ``"c"``) give None: dropping their pages would lose edits.
    """
    mm = getattr(arr, "_mmap", None)
    if mm is None or getattr(arr, "mode", "r") == "c":
        return None
    return mm if isinstance(mm, mmap.mmap) and not mm.closed else None


def release_pages(arr: Any, flush: bool = False) -> None:
    """Drop the resident pages of a memory-mapped array from this process (best effort).

    With `flush`, dirty pages are written (msync) first. Does nothing for arrays that are
    not memory maps (numpy, zarr).
    """
    mm = mmap_of(arr)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    try:
        if flush:
            mm.flush()
        mm.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass


class _PageReleasingReader:
    """Array-like view of a memory map whose reads copy and then release the pages."""

    def __init__(self, data: Any) -> None:
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.array(self.data[key])
        release_pages(self.data)
        return out


def page_releasing(data: Any) -> Any:
    """Wrap a memory-mapped array so slab-wise scans (statistics, NaN checks) do not
    leave it resident; other arrays are returned unchanged."""
    return _PageReleasingReader(data) if mmap_of(data) is not None else data


__all__ = ["mmap_of", "page_releasing", "release_pages"]
