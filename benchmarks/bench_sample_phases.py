"""Wall time and resident memory of each phase of `cryowae.sampling.files.sample_file`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sample_phases.py MODEL TOMO OUT \
        [--n 16]

Runs `sample_file` with the CLI's defaults (prior sampler, tile 96, overlap 32, batch
4, spread calibration ``auto``, local spread on, float16 samples) and prints, per
phase, its wall time, the CPU time of the process (all threads) and its peak RSS: the
kernel's high-water mark, reset at each phase's start (``/proc/self/clear_refs``),
where the kernel allows it, else what a thread reading ``/proc/self/status`` every
50 ms saw; indented rows are parts of the row above. On a shared machine the CPU time
is the steadier figure.

The phases are timed by wrapping, for the duration of this run, the functions that
`sample_file` calls by name in its module (and the wedge ratio and error-model fit in
theirs); nothing they compute changes. The wrapped names of earlier versions of
files.py (``_centre``, ``_moments``, ``_export``) are wrapped too, so that the same
script times an older checkout put first on ``PYTHONPATH`` (a phase a version does not
run is not printed).
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from typing import Any

from proc_memory import reset_peak, vm_kb

#: (module, function, label); labels starting with spaces are parts of a phase
PHASES = (
    ("cryowae.sampling.files", "run_family", "sampling (run_family)"),
    ("cryowae.sampling.files", "_centre", "centre restoration"),
    ("cryowae.sampling.files", "restored_centre", "centre restoration (when not from the pass)"),
    ("cryowae.sampling.files", "calibrate_store", "spread calibration"),
    ("cryowae.sampling.store_calibration", "estimate_factors", "  factors (wedge ratio, SURE)"),
    ("cryowae.sampling.wedge_ratio", "wedge_ratio", "    wedge ratio"),
    ("cryowae.sampling.files", "localise_store", "local spread"),
    ("cryowae.sampling.files", "_moments", "moments + consistency check"),
    ("cryowae.sampling.files", "write_moments", "moments + consistency check"),
    ("cryowae.sampling.files", "self_check", "self-check"),
    ("cryowae.sampling.files", "_export", "export to samples.zarr"),
    ("cryowae.sampling.files", "export_samples", "export to samples.zarr"),
)


class _Memory:
    """Peak RSS (GB) since the last `reset`: the kernel's high-water mark (VmHWM, reset
    by writing 5 to /proc/self/clear_refs) where that is allowed, else what a daemon
    thread reads every 50 ms (which misses spikes shorter than that)."""

    def __init__(self) -> None:
        self.peak = self.overall = 0.0
        self.exact = reset_peak()
        threading.Thread(target=self._poll, daemon=True).start()

    @staticmethod
    def _read(key: str) -> float:
        return max(vm_kb(key), 0) / 1e6

    def rss(self) -> float:
        return self._read("VmRSS")

    def reset(self) -> None:
        if self.exact:
            self.overall = max(self.overall, self._read("VmHWM"))
            reset_peak()
        self.peak = self.rss()

    def current_peak(self) -> float:
        """The peak since the last `reset`."""
        if self.exact:
            self.peak = max(self.peak, self._read("VmHWM"))
        self.overall = max(self.overall, self.peak)
        return self.peak

    def _poll(self) -> None:
        while True:
            r = self.rss()
            self.peak, self.overall = max(self.peak, r), max(self.overall, r)
            time.sleep(0.05)


def _wrap(module: Any, name: str, label: str, mem: _Memory,
          rows: list[tuple[float, str, float, float, float]]) -> None:
    fn = getattr(module, name, None)
    if fn is None:
        return
    top = not label.startswith(" ")

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if top:
            mem.reset()
        t, c = time.perf_counter(), time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            rows.append((t, label, time.perf_counter() - t, time.process_time() - c,
                         mem.current_peak() if top else float("nan")))

    setattr(module, name, timed)


def main() -> None:
    import importlib

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("tomogram")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=16)
    a = ap.parse_args()
    mem, rows = _Memory(), []
    for mod, name, label in PHASES:
        _wrap(importlib.import_module(mod), name, label, mem, rows)
    import cryowae
    from cryowae.sampling.files import sample_file
    from cryowae.sampling.settings import SamplerSettings, StorageSettings

    print(f"cryowae from {cryowae.__file__}; peak RSS "
          f"{'from the kernel (VmHWM)' if mem.exact else 'polled every 50 ms'}")
    t0, c0 = time.perf_counter(), time.process_time()
    sample_file(a.model, a.tomogram, a.out, SamplerSettings(a.n),
                storage=StorageSettings(overwrite=True), device="cpu")
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{'phase':44s} {'wall':>9s} {'CPU':>9s}   peak RSS")
    for _start, label, t, c, peak in sorted(rows):
        print(f"{label:44s} {t:7.1f} s {c:7.1f} s   {peak:5.2f} GB")
    mem.reset()  # folds the last phase's high-water mark into the overall peak
    print(f"{'sample_file':44s} {total:7.1f} s {cpu:7.1f} s   {mem.overall:5.2f} GB")


if __name__ == "__main__":
    main()
