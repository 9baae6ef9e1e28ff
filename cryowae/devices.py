"""Choosing the torch device from a user's ``--device`` option."""

from __future__ import annotations

import torch

from cryowae.errors import CryowaeInputError


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses cuda without a GPU."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CryowaeInputError("--device cuda asked for, but torch sees no CUDA GPU")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CryowaeInputError(f"--device: unknown device {name!r} (auto, cpu or cuda)"
                                ) from None
