"""The process's resident memory from /proc (Linux), for the benchmarks that report
peaks: the kernel's fields and the reset of its high-water mark."""

from __future__ import annotations


def vm_kb(key: str) -> int:
    """A ``Vm*`` field of /proc/self/status (e.g. ``VmRSS``, ``VmHWM``) in KiB; -1 when
    absent."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs); False where
    the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
