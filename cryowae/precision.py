"""How the networks compute: bf16 autocast, memory layout, optional `torch.compile`.

One place for the choices that training (`cryowae.training.loop`), every tiled pass
(`cryowae.tiling.runner.model_tile_fn`) and the samplers (`cryowae.sampling.samplers`)
make, so all behave the same way:

- bf16 autocast (`amp_active`): on CUDA unless turned off; on a CPU only when asked
  for (``--amp``) and the CPU has bf16 instructions (`cpu_has_bf16`: ``avx512_bf16`` or
  ``amx_bf16``, ``bf16`` on Arm), where `amp_note` says so in one line. Without them
  torch's CPU bf16 convolutions fall back to a slow reference kernel, so ``--amp`` is
  ignored there (one line, float32). The CPU default is off (`CPU_AMP_DEFAULT`): the
  bf16 restoration differs from the float32 one by more than the 1e-3 relative RMS
  allowed, even with the restorer's output path in float32 (docs/benchmarks.md, "CPU
  compute path"). The weights stay float32 (autocast casts per operation); the
  restorer's low-pass skip, head and their sum run in float32
  (`cryowae.models.restorer`), and losses and FFTs too, because the callers put only
  the network inside `autocast` and call ``.float()`` on its outputs. With amp off the
  network runs exactly as without autocast.
- ``channels_last_3d`` for the weights and inputs (`to_layout`), when asked for.
- `torch.compile` behind a flag (`compiled`): when compiling fails -- at wrapping time
  (unknown backend) or at the first call (the backend raised) -- one line goes to
  `log` and the network runs eagerly from then on (`CompileFallback`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from cryowae.errors import CryowaeInputError

#: device types on which ``amp`` (on by default) turns on bf16 autocast
BF16_AUTOCAST_DEVICES: frozenset[str] = frozenset({"cuda"})
#: bf16 autocast on a CPU with bf16 instructions when ``--amp`` is not given: off, the
#: bf16 restoration differs from float32 by more than 1e-3 relative RMS (on only if it
#: stays within that)
CPU_AMP_DEFAULT = False
#: /proc/cpuinfo flags of native bf16 arithmetic (x86 AVX-512 BF16 and AMX; Arm BF16)
CPU_BF16_FLAGS: frozenset[str] = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

Log = Callable[[str], None]


@dataclass(frozen=True)
class ComputeSettings:
    """How a network runs on its device.

    Attributes
    ----------
    amp
        bf16 autocast (`amp_active`): None = the device's default (on for CUDA,
        `CPU_AMP_DEFAULT` on a CPU with bf16 instructions), True = on where the device
        supports it, False = float32.
    channels_last
        ``torch.channels_last_3d`` layout for the weights and the inputs.
    compile
        Wrap the network in `torch.compile` (eager fallback on failure).
    compile_backend
        The `torch.compile` backend (``inductor``; ``eager`` / ``aot_eager`` trace
        without generating code).
    """

    amp: bool | None = None
    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise CryowaeInputError("--compile-backend must be a backend name")


def cpuinfo_bf16_flags(text: str) -> list[str]:
    """The bf16 flags (`CPU_BF16_FLAGS`) named on the ``flags`` (x86) or ``Features``
    (Arm) lines of a /proc/cpuinfo text, sorted."""
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            found |= CPU_BF16_FLAGS & set(value.split())
    return sorted(found)


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """This machine's bf16 CPU flags, read once from /proc/cpuinfo (empty where there is
    none: such a CPU runs float32). torch's ``get_cpu_capability()`` names the vector
    width (AVX2, AVX512) but not bf16, so the kernel's flags decide."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            return tuple(cpuinfo_bf16_flags(fh.read()))
    except OSError:
        return ()


def cpu_has_bf16() -> bool:
    """True when this machine's CPU has native bf16 instructions (`cpu_bf16_flags`)."""
    return bool(cpu_bf16_flags())


def amp_active(device: torch.device | str, amp: bool | None) -> bool:
    """True when `amp` (None: the device's default) turns on bf16 autocast on `device`:
    CUDA unless `amp` is False; a CPU with bf16 instructions when `amp` is True (or
    None and `CPU_AMP_DEFAULT`)."""
    kind = torch.device(device).type
    if amp is False:
        return False
    if kind in BF16_AUTOCAST_DEVICES:
        return True
    if kind == "cpu":
        return (amp is True or CPU_AMP_DEFAULT) and cpu_has_bf16()
    return False


def amp_note(device: torch.device | str, requested: bool | None,
             effective: bool | None = None) -> str | None:
    """One line about bf16 autocast, else None: that it runs on the CPU (it does when
    `effective`, default `requested`, turns it on there), or that ``--amp`` was asked
    for (`requested`: the option as given, None when not given) on a device without
    bf16 autocast and the run continues in float32."""
    device = torch.device(device)
    effective = requested if effective is None else effective
    if device.type == "cpu" and amp_active(device, effective):
        return (f"note: bf16 autocast on the CPU ({', '.join(cpu_bf16_flags())}); "
                "--no-amp runs in float32")
    if requested and not amp_active(device, requested):
        why = ("this CPU has no bf16 instructions (avx512_bf16, amx_bf16)"
               if device.type == "cpu" else
               "bf16 autocast is used on CUDA and on CPUs with bf16 instructions only")
        return f"note: --amp ignored on {device.type}: {why}; running in float32"
    return None


def autocast(device: torch.device | str, amp: bool | None
             ) -> contextlib.AbstractContextManager:
    """bf16 autocast for `device` when `amp_active`, else a no-op context (the network
    then runs exactly as without autocast). Put only the network inside it; cast its
    outputs with ``.float()`` before losses and FFTs."""
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
    "BF16_AUTOCAST_DEVICES", "CPU_AMP_DEFAULT", "CPU_BF16_FLAGS", "CompileFallback",
    "ComputeSettings", "amp_active", "amp_note", "autocast", "compile_warning", "compiled",
    "cpu_bf16_flags", "cpu_has_bf16", "cpuinfo_bf16_flags", "prepare", "to_layout",
]
