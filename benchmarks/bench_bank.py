"""Memory-bank designs for latent matching: where do the codes of the final model lie?

    python benchmarks/bench_bank.py --sim bench_train_out/sim_seed0 --minutes 3 \\
        --designs minibatch uncentred uncentred-grad short centred --out bench_bank_out

Trains the `cpu-small` preset (IMQ-MMD unless --divergence) on a simulated tomogram's
even/odd halves (made by `cryowae simulate` or `benchmarks/bench_train.py`) with each
bank design for the same wall-clock budget, then encodes 256 fresh subtomograms with the
final model (`Trainer.fresh_codes`; the run stores them in model.pt) and reports the norm
of their mean, their mean per-dimension standard deviation (the N(0, I) prior has 0 and
1) and their IMQ-MMD to a prior sample. Designs (training-config overrides):

- minibatch: no bank (``bank_size 0``);
- uncentred: banked features through the current head, detached, not re-centred;
- uncentred-grad: as uncentred, with the penalty's gradient through the banked codes;
- short: uncentred with a bank of 64;
- centred: the default (detached, re-centred on the batch mean).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DESIGNS = {
    "minibatch": {"bank_size": 0},
    "uncentred": {"bank_centering": False},
    "uncentred-grad": {"bank_centering": False, "bank_grad": True},
    "short": {"bank_centering": False, "bank_size": 64},
    "centred": {},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sim", type=Path, required=True, help="folder of cryowae simulate")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=list(DESIGNS))
    ap.add_argument("--divergence", default="mmd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_bank_out"))
    a = ap.parse_args()
    command = "python " + " ".join(sys.argv)

    from cryowae.models.checkpoint import load_restorer
    from cryowae.training.config import load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import train

    rows = []
    for name in a.designs:
        cfg = load_config("cpu-small").replace(minutes=a.minutes, steps=10**9, seed=a.seed,
                                                divergence=a.divergence, **DESIGNS[name])
        sources = load_sources([a.sim / "tomo.mrc"], [a.sim / "tomo_even.mrc"],
                               [a.sim / "tomo_odd.mrc"], min_size=cfg.patch_size)
        t0 = time.time()
        res = train(sources, cfg, a.out / name)
        # the fresh codes the run stored in model.pt, and the MMD it computed on them
        codes = load_restorer(a.out / name / "model.pt").codes
        row = {"design": name, "steps": res.steps, "seconds": round(time.time() - t0),
               "mean_norm": float(codes.mean(0).norm()),
               "std": float(codes.std(0).mean()),
               "mmd_to_prior": res.final["mmd_to_prior"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| design | steps | mean of z | std of z | MMD to prior |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['design']} | {r['steps']} | {r['mean_norm']:.2f} | {r['std']:.3f} | "
              f"{r['mmd_to_prior']:.2f} |")
    print(f"\ncommand: {command}")


if __name__ == "__main__":
    main()
