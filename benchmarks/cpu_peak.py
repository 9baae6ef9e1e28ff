"""The CPU's peak FLOP rate and the rate a 3D convolution achieves, float32 and bf16
(the CPU rows of benchmarks/gpu_check.py).

Peak of one core, FLOPs per cycle (`flops_per_cycle`):

- float32: FMA pipes x float32 lanes of the datapath x 2 (a fused multiply-add is two
  FLOPs). Two FMA pipes; the datapath is 512 bits with ``avx512f`` (Intel server cores,
  AMD from family 26, Zen 5), 256 bits with AVX2 FMA and on AMD family 25 (Zen 3; Zen 4
  runs AVX-512 as two 256-bit halves): 64 or 32 FLOPs per cycle. A core with one
  512-bit FMA pipe (some Xeon Silver/Bronze) does half: pass ``fp32_per_cycle``.
- bf16: with ``avx512_bf16`` twice the float32 rate (``vdpbf16ps`` sums two bf16
  products into each float32 lane per instruction); AMX tiles (``amx_bf16``) go beyond
  it and are not counted. Without bf16 instructions there is no bf16 peak: torch then
  runs bf16 convolutions through slower fallback kernels.

peak = threads x GHz x FLOPs per cycle, the clock from ``lscpu`` (``CPU max MHz``, else
``CPU MHz``), else /proc/cpuinfo's ``cpu MHz`` (lscpu under some hypervisors names none).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuPeak:
    """Peak rates of `threads` cores at `ghz` (TFLOP/s; bf16 None without bf16)."""

    threads: int
    ghz: float
    fp32_per_cycle: int
    bf16_per_cycle: int | None

    @property
    def fp32_tflops(self) -> float:
        return self.threads * self.ghz * self.fp32_per_cycle / 1e3

    @property
    def bf16_tflops(self) -> float | None:
        if self.bf16_per_cycle is None:
            return None
        return self.threads * self.ghz * self.bf16_per_cycle / 1e3

    def formula(self, bf16: bool) -> str:
        per = self.bf16_per_cycle if bf16 else self.fp32_per_cycle
        return f"{self.threads} cores x {self.ghz:.2f} GHz x {per} FLOPs/cycle"


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first value of each ``key : value`` line of an lscpu or /proc/cpuinfo text,
    keys lower-cased."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() not in out:
            out[key.strip().lower()] = value.strip()
    return out


def clock_ghz(lscpu: str, cpuinfo: str = "") -> float | None:
    """The clock in GHz: lscpu's ``CPU max MHz``, else its ``CPU MHz``, else the
    ``cpu MHz`` of /proc/cpuinfo; None when none is given."""
    for fields, key in ((cpuinfo_fields(lscpu), "cpu max mhz"),
                        (cpuinfo_fields(lscpu), "cpu mhz"),
                        (cpuinfo_fields(cpuinfo), "cpu mhz")):
        try:
            mhz = float(fields[key].replace(",", "."))
        except (KeyError, ValueError):
            continue
        if mhz > 0:
            return mhz / 1e3
    return None


def flops_per_cycle(fields: dict[str, str]) -> tuple[int | None, int | None]:
    """(float32, bf16) FLOPs per cycle of one core (module docstring) from the lscpu /
    cpuinfo `fields` (``flags``, ``vendor id``/``vendor_id``, ``cpu family``); None
    where not known (not x86 FMA) or absent (bf16 without bf16 instructions)."""
    flags = set(fields.get("flags", "").split())
    if "fma" not in flags:
        return None, None
    vendor = fields.get("vendor id", fields.get("vendor_id", ""))
    family = fields.get("cpu family", "0").strip()
    amd_256 = vendor == "AuthenticAMD" and family.isdigit() and int(family) <= 25
    bits = 512 if "avx512f" in flags and not amd_256 else 256
    fp32 = 2 * (bits // 32) * 2
    return fp32, (2 * fp32 if "avx512_bf16" in flags else None)


def this_cpu(threads: int | None = None, fp32_per_cycle: int | None = None
             ) -> CpuPeak | None:
    """This machine's `CpuPeak` for `threads` (default torch's thread count); None when
    the clock or the FLOPs per cycle are not known."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True,
                               env={"LC_ALL": "C"}).stdout
    except OSError:
        lscpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            cpuinfo = fh.read()
    except OSError:
        cpuinfo = ""
    ghz = clock_ghz(lscpu, cpuinfo)
    fields = cpuinfo_fields(cpuinfo) | cpuinfo_fields(lscpu)
    fp32, bf16 = flops_per_cycle(fields)
    if fp32_per_cycle:
        fp32, bf16 = fp32_per_cycle, (2 * fp32_per_cycle if bf16 else None)
    if ghz is None or fp32 is None:
        return None
    return CpuPeak(threads or torch.get_num_threads(), ghz, fp32, bf16)


def conv_rate(bf16: bool, size: int, channels: int = 12, batch: int = 4,
              repeats: int = 2) -> tuple[float, float]:
    """(TFLOP/s, seconds per call) of a 3x3x3 `channels` -> `channels` convolution of
    `batch` x `size`^3 voxels (padding 1), in float32 or in bf16 autocast: 2 x C_in x
    C_out x 27 FLOPs per output voxel, the best of `repeats` timed calls after one
    untimed."""
    x = torch.randn(batch, channels, size, size, size)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1)
    flops = 2 * channels * channels * 27 * batch * size ** 3
    best = float("inf")
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        conv(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t0)
    return flops / best / 1e12, best


__all__ = ["CpuPeak", "clock_ghz", "conv_rate", "cpuinfo_fields", "flops_per_cycle",
           "this_cpu"]
