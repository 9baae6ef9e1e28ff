"""A per-process cache of loaded restorers (Dask workers, the napari plugin).

Loading a checkpoint costs a second or more; a worker restoring hundreds of blocks, or a
viewer restoring one tomogram after another with the same model, loads it once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from cryowae.models.checkpoint import LoadedRestorer, load_restorer

_LOCK = threading.Lock()
_CACHE: dict[tuple[str, int, int, str], LoadedRestorer] = {}


def model_file(path: str | os.PathLike) -> Path:
    """``model.pt`` itself, or the one inside a run directory."""
    p = Path(path)
    return p / "model.pt" if p.is_dir() else p


def cached_restorer(path: str | os.PathLike, device: str = "cpu") -> LoadedRestorer:
    """The `LoadedRestorer` of `path` on `device`, loaded once per process.

    Keyed by (resolved path, size, modification time, device): a checkpoint rewritten
    in place is loaded again. Only the latest model is kept, so a long-lived process
    does not accumulate networks.
    """
    f = model_file(path)
    if not f.is_file():
        return load_restorer(f, device)  # raises the one-line error for a missing file
    st = f.stat()
    key = (str(f.resolve()), int(st.st_size), int(st.st_mtime_ns), str(device))
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = load_restorer(f, device)
        return _CACHE[key]


def clear_cache() -> None:
    """Forget every cached restorer (frees their memory)."""
    with _LOCK:
        _CACHE.clear()


__all__ = ["cached_restorer", "clear_cache", "model_file"]
