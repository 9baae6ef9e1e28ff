"""The resume state of `cryowae.sampling.files.sample_file`: the run's fingerprint, the
finished samples, the calibration's, the local spread's and the output's steps, in
``state.json``."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cryowae.io.atomic import atomic_path
from cryowae.progress import ProgressReporter


def json_ready(o: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, inf/nan as null, paths as text."""
    if isinstance(o, dict):
        return {str(k): json_ready(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_ready(v) for v in o]
    if isinstance(o, np.floating | np.integer):
        o = o.item()
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, bool | int | str):
        return o
    return str(o)


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_ready(obj), indent=2, allow_nan=False) + "\n")


def fingerprint(paths: Sequence[Path], params: dict[str, Any]) -> dict[str, Any]:
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns]
             for p in paths if p.is_file()]
    return json_ready({"files": files, "params": params})


class FamilyRun:
    """The resume state of one family in ``partial/state.json``: the run's fingerprint,
    the finished samples, the calibration's and the local spread's steps, rewritten
    atomically after each step. A state of another run's settings is discarded (and said so)."""

    def __init__(self, partial: Path, fingerprint: dict[str, Any], n_samples: int,
                 prog: ProgressReporter) -> None:
        self.path, self.fingerprint, self.n = partial / "state.json", fingerprint, n_samples
        self.done: list[int] = []
        self.calibration: dict[str, Any] = {}
        self.local: dict[str, Any] = {}
        self.output: dict[str, Any] = {}
        if self.path.is_file():
            state = json.loads(self.path.read_text())
            if state.get("fingerprint") == fingerprint:
                self.done = sorted(int(s) for s in state.get("done", []))
                self.calibration = state.get("calibration", {})
                self.local = state.get("local", {})
                self.output = state.get("output", {})
                prog.log(f"resuming: {len(self.done)} of {n_samples} samples already done")
            else:
                prog.log(f"{partial}: left by a run with other settings; starting over")
                shutil.rmtree(partial)
        elif partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)

    def todo(self) -> list[int]:
        return [s for s in range(self.n) if s not in set(self.done)]

    def save(self) -> None:
        write_json(self.path, {"fingerprint": self.fingerprint, "done": sorted(self.done),
                                "calibration": self.calibration, "local": self.local,
                                "output": self.output})

    def finished(self, s: int) -> None:
        self.done.append(int(s))
        self.save()

    def close(self) -> None:
        self.path.unlink()


__all__ = ["FamilyRun", "fingerprint", "json_ready", "write_json"]
