"""How the networks compute: bf16 autocast, memory layout, optional `torch.compile`.

One place for the choices that training (`cryowae.training.loop`) and every tiled pass
(`cryowae.tiling.runner.model_tile_fn`) make, so both behave the same way:

- bf16 autocast only on the device types in `BF16_AUTOCAST_DEVICES` (CUDA). The weights
  stay float32 (autocast casts per operation); losses and FFTs run in float32 because
  the callers put only the network inside `autocast` and call ``.float()`` on its
  outputs. On other devices the network runs in float32 and `amp_note` gives the one
  line to show when ``--amp`` was asked for there.
- ``channels_last_3d`` for the weights and inputs (`to_layout`), when asked for.
- `torch.compile` behind a flag (`compiled`): when compiling fails -- at wrapping time
  (unknown backend) or at the first call (the backend raised) -- one line goes to
  `log` and the network runs eagerly from then on (`CompileFallback`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cryowae.errors import CryowaeInputError

#: device types on which ``amp`` turns on bf16 autocast
BF16_AUTOCAST_DEVICES: frozenset[str] = frozenset({"cuda"})

Log = Callable[[str], None]


@dataclass(frozen=True)
class ComputeSettings:
    """How a network runs on its device.

    Attributes
    ----------
    amp
        bf16 autocast on CUDA (float32 master weights); ignored elsewhere.
    channels_last
        ``torch.channels_last_3d`` layout for the weights and the inputs.
    compile
        Wrap the network in `torch.compile` (eager fallback on failure).
    compile_backend
        The `torch.compile` backend (``inductor``; ``eager`` / ``aot_eager`` trace
        without generating code).
    """

    amp: bool = True
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise CryowaeInputError("--compile-backend must be a backend name")


def amp_active(device: torch.device | str, amp: bool) -> bool:
    """True when `amp` turns on bf16 autocast on `device`."""
    return bool(amp) and torch.device(device).type in BF16_AUTOCAST_DEVICES


def amp_note(device: torch.device | str, requested: bool | None) -> str | None:
    """The line to show when ``--amp`` was asked for on a device without bf16 autocast
    (the run continues in float32), else None. `requested`: the option as given (None:
    not given)."""
    device = torch.device(device)
    if requested and device.type not in BF16_AUTOCAST_DEVICES:
        return (f"note: --amp ignored on {device.type}: bf16 autocast is used on CUDA "
                "only; running in float32")
    return None


def autocast(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast for `device` when `amp_active`, else a no-op context. Put only the
    network inside it; cast its outputs with ``.float()`` before losses and FFTs."""
    device = torch.device(device)
    if amp_active(device, amp):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """`x` (B, C, Z, Y, X) in ``channels_last_3d`` when asked for, else unchanged."""
    if channels_last and x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


class CompileFallback(torch.nn.Module):
    """A module that calls its `torch.compile` version and, the first time compilation
    fails (a `torch._dynamo` error: the backend raised, tracing failed), says so in one
    line and runs the eager module from then on. Errors of the computation itself (e.g.
    out of memory) propagate unchanged. ``train()``/``eval()`` reach the eager module,
    whose parameters the compiled one shares."""

    def __init__(self, module: torch.nn.Module, compiled: Any, backend: Any,
                 log: Log | None = None) -> None:
        super().__init__()
        self.eager = module
        object.__setattr__(self, "_compiled", compiled)  # not a second submodule
        self.backend = backend
        self.failed = compiled is None
        self._log = log or (lambda _msg: None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.failed:
            from torch._dynamo.exc import TorchDynamoException

            try:
                return self._compiled(*args, **kwargs)
            except TorchDynamoException as exc:
                self.failed = True
                self._log(compile_warning(self.backend, exc))
        return self.eager(*args, **kwargs)


def compile_warning(backend: Any, exc: BaseException) -> str:
    """One line: compilation with `backend` (a name or a backend function) failed, with
    the first line of the error that made it fail; the network runs eagerly."""
    inner = getattr(exc, "inner_exception", None) or exc
    first = (str(inner).strip().splitlines() or [type(inner).__name__])[0]
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", backend)
    return (f"warning: torch.compile (backend {name}) failed: {first[:160]}; running "
            "eagerly")


def compiled(module: torch.nn.Module, backend: Any = "inductor",
             log: Log | None = None) -> CompileFallback:
    """`module` behind `torch.compile` with an eager fallback (`CompileFallback`); a
    failure to wrap (e.g. an unknown backend) is reported through `log` at once."""
    try:
        comp = torch.compile(module, backend=backend)
    except Exception as exc:  # InvalidBackend, unsupported Python/platform, ...
        if log is not None:
            log(compile_warning(backend, exc))
        comp = None
    return CompileFallback(module, comp, backend, log)


def prepare(module: torch.nn.Module, settings: ComputeSettings,
            log: Log | None = None) -> torch.nn.Module:
    """`module` made ready to run under `settings`: converted in place to
    ``channels_last_3d`` when asked for, and wrapped by `compiled` when asked for."""
    if settings.channels_last:
        module.to(memory_format=torch.channels_last_3d)
    if settings.compile:
        return compiled(module, settings.compile_backend, log)
    return module


__all__ = [
    "BF16_AUTOCAST_DEVICES", "CompileFallback", "ComputeSettings", "amp_active",
    "amp_note", "autocast", "compile_warning", "compiled", "prepare", "to_layout",
]
