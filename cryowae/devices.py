"""Choosing the torch device from a user's ``--device`` option, the training preset that
goes with it, and the free memory of a CUDA device."""

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


#: the training preset chosen without --config, by device type
DEVICE_PRESETS = {"cuda": "gpu-default", "cpu": "cpu-small"}


def preset_for(device: torch.device | str) -> str:
    """The training preset for `device` (a resolved device, not ``auto``): ``gpu-default``
    on CUDA, ``cpu-small`` elsewhere."""
    return DEVICE_PRESETS.get(torch.device(device).type, "cpu-small")


def free_memory(device: torch.device | str) -> int | None:
    """Bytes this process can still allocate on a CUDA `device`: the driver's free memory
    plus what torch's caching allocator holds unused; None on other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device)
               - torch.cuda.memory_allocated(device))
