"""Atomic writes: produce an output under a temporary name, then rename it.

An interrupted write (crash, Ctrl-C, full disk) never leaves a half-written file or
store under the final name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from cryowae.errors import CryowaeInputError


def temporary_sibling(path: Path) -> Path:
    """A unique temporary path in the same directory as `path` (same file system)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def check_output_path(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Validate an output path: its folder is creatable, and it exists only if allowed."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise CryowaeInputError(f"output {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it is renamed to `path`.

    Works for files and for directory stores (Zarr). On any exception the temporary
    output is removed and the exception propagates; the final path is untouched.
    """
    final = check_output_path(path, overwrite)
    tmp = temporary_sibling(final)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.is_dir() and not final.is_symlink():
        # os.replace cannot replace a non-empty directory: move the old one aside first.
        old = temporary_sibling(final)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)
