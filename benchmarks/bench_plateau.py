"""Acceptance benchmark of the plateau call: does `train` say "plateaued" when the
restoration stops improving?

    OMP_NUM_THREADS=1 python benchmarks/bench_plateau.py --seeds 61 62 63 --steps 200 \
        --out bench_plateau_out

For each seed: `cryowae simulate` (96 -> 64x96x96 at 8 A, procedural particles, CTF,
even/odd halves); train on the halves for a fixed number of steps (`SMALL`: the
architecture of the quick measurement in docs/architecture.md, family branch off;
validation on with its defaults; not stopping at the plateau, so the whole curve is
seen), keeping the weights model.pt would store (the running average,
`cryowae.training.averaging`) and the last step's at each tenth of the steps and at the
step of the plateau call. A step budget, not a time budget: on a shared machine the
steps of a fixed time vary with the load. Each kept model restores the central
``--crop`` square of Y and X (all of Z; one pass, `restore_array`) and is scored by its
Pearson correlation to the ground truth (the averaged weights decide; the last step's
are scored beside them). The knee is the first tenth after which the best Pearson so far
rises by no more than ``--rise`` (0.005) per tenth (`knee_index`); the plateau call
passes when its step lies within ``--tolerance`` (20 %) of the knee's step. A run still
rising in its last tenth has no knee: the call passes there only if it was not made.
Prints a Markdown table, writes result_seed<seed>.json, and prints the command.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryowae.progress import ProgressReporter


class Snapshots(ProgressReporter):
    """Keeps the trainer's weights at each tenth of the run's steps and at the plateau
    call (the trainer is attached after it is made, before `run`)."""

    def __init__(self, steps: int, parts: int = 10) -> None:
        super().__init__()
        self.every = steps // parts
        self.trainer = None
        self.kept: list[dict] = []  # {"label", "step", "elapsed", "weights"}
        self.plateau_kept = False
        self.diagnostics: list[dict] | None = None  # per evaluation, with --diagnostics
        self.outputs: list[np.ndarray] = []

    def _diagnose(self, val) -> None:
        """The validation crops' restorations at this evaluation (float16) and each
        crop's loss with its measured and wedge parts: material for developing a
        plateau rule offline."""
        from cryowae.training.augment import TrainingBatch
        from cryowae.training.loss import masked_fourier_loss

        model = self.trainer.kept_model
        was = model.training
        model.eval()
        outs, per_crop = [], []
        with torch.inference_mode():
            for batch in val.batches:
                restored = model(batch.inputs)[0].float()
                for i in range(batch.inputs.shape[0]):
                    one = TrainingBatch(batch.inputs[i:i + 1], batch.targets[i:i + 1],
                                        batch.valid[i:i + 1],
                                        batch.target_measured[i:i + 1],
                                        batch.input_measured)
                    loss, p = masked_fourier_loss(restored[i:i + 1], one, val.wedge_weight)
                    per_crop.append([float(loss), p["rec_measured"], p["rec_wedge"]])
                outs.append(restored[:, 0].numpy().astype(np.float16))
        model.train(was)
        self.diagnostics.append({"step": self.trainer.step, "val_loss": val.values[-1],
                                 "per_crop": per_crop})
        self.outputs.append(np.concatenate(outs))

    def _keep(self, label: str) -> None:
        tr = self.trainer
        self.kept.append({"label": label, "step": tr.step, "elapsed": tr.elapsed,
                          "weights": copy.deepcopy(tr.kept_model.state_dict()),
                          "raw": copy.deepcopy(tr.model.state_dict())})

    def advance(self, n: int = 1, **info) -> None:
        super().advance(n, **info)
        tr = self.trainer
        val = tr.validation
        if self.diagnostics is not None and val is not None and val.steps \
                and val.steps[-1] == tr.step:
            self._diagnose(val)
        if tr.step % self.every == 0:
            self._keep(str(tr.step // self.every))
        val = tr.validation
        if val is not None and val.plateau_step is not None and not self.plateau_kept:
            self.plateau_kept = True
            self._keep("plateau")

    def log(self, message: str) -> None:
        print(message, flush=True)


def simulate(out: Path, seed: int, size: int) -> Path:
    sim = out / f"sim_seed{seed}"
    if not (sim / "gt.mrc").exists():
        subprocess.run([sys.executable, "-m", "cryowae", "simulate", str(sim), "--size",
                        str(size), "--seed", str(seed), "--voxel-size", "8", "--overwrite"],
                       check=True)
    return sim


def knee_index(pearson: list[float], rise: float) -> int | None:
    """The first index k into `pearson` (one value per tenth of the run, the first
    tenth first) after which the best Pearson so far gains no more than `rise` per
    tenth; None when the last tenth still gains more. The best so far (running
    maximum), not the raw value: the weights of a step fluctuate (the raw Pearson moved
    by up to 0.03 between neighbouring tenths of the development run), and a dip
    followed by its recovery is no rise."""
    gains = np.diff(np.maximum.accumulate(np.asarray(pearson, dtype=np.float64)))
    if gains[-1] > rise:
        return None
    for k in range(len(pearson)):
        if np.all(gains[k:] <= rise):
            return k
    return len(pearson) - 1


#: the training of the benchmark: the architecture of the quick measurement in
#: docs/architecture.md ("Posterior families"), the mean path alone
SMALL = {"patch_size": 32, "restorer": {"channels": 8, "depth": 2, "latent_dim": 16},
         "batch_size": 4, "lr": 0.002, "bank_size": 256, "family": False,
         "log_every": 5, "checkpoint_every": 50}


def run_seed(out: Path, seed: int, steps: int, config: str | None, size: int, tile: int,
             crop: int, rise: float, tolerance: float, diagnostics: bool = False) -> dict:
    from cryowae.inference.restore import restore_array
    from cryowae.io import read_volume
    from cryowae.metrics.correlation import pearson
    from cryowae.models.protocol import ModelOnDevice
    from cryowae.models.restorer import WAERestorer
    from cryowae.training.config import TrainConfig, load_config
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    done = out / f"result_seed{seed}.json"
    if done.exists():
        return json.loads(done.read_text())
    sim = simulate(out, seed, size)
    run = out / f"run_seed{seed}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    base = load_config(config) if config else TrainConfig.from_dict(SMALL)
    cfg = base.replace(steps=steps, seed=seed, num_threads=1, device="cpu")
    sources = load_sources([sim / "tomo.mrc"], [sim / "tomo_even.mrc"],
                           [sim / "tomo_odd.mrc"], min_size=cfg.patch_size)
    snaps = Snapshots(steps)
    if diagnostics:
        snaps.diagnostics = []
    trainer = Trainer(sources, cfg, run, progress=snaps)
    snaps.trainer = trainer
    t0, c0 = time.time(), time.process_time()
    res = trainer.run()
    t_train, cpu_train = time.time() - t0, time.process_time() - c0
    snaps.trainer = trainer
    val = trainer.validation
    assert val is not None
    tomo = read_volume(sim / "tomo.mrc").numpy()
    gt = read_volume(sim / "gt.mrc").numpy()
    # the central crop-voxel square of Y and X, all of Z: the restorations cost less
    y0, x0 = ((s - min(crop, s)) // 2 for s in tomo.shape[1:])
    box = np.s_[:, y0:y0 + crop, x0:x0 + crop]
    tomo, gt = np.ascontiguousarray(tomo[box]), np.ascontiguousarray(gt[box])
    model = WAERestorer(cfg.restorer).eval()
    scores = []
    t0 = time.time()
    def score(weights: dict) -> float:
        model.load_state_dict(weights)
        return pearson(restore_array(ModelOnDevice(model, torch.device("cpu")), tomo,
                                     tile=tile, overlap=tile // 3), gt)

    for k in snaps.kept:
        # the stored (averaged) weights decide the knee; the last step's weights are
        # scored beside them (the same when cfg.ema_decay is 0)
        scores.append({"label": k["label"], "step": k["step"],
                       "elapsed": round(k["elapsed"], 1), "pearson": score(k["weights"])})
        if cfg.ema_decay > 0:
            scores[-1]["pearson_raw"] = score(k["raw"])
        print(f"seed {seed} {k['label']:>7s} step {k['step']:4d} pearson "
              f"{scores[-1]['pearson']:.4f} (last step's weights "
              f"{scores[-1].get('pearson_raw', scores[-1]['pearson']):.4f})", flush=True)
    t_restore = time.time() - t0
    tenths = [s for s in scores if s["label"] != "plateau"]
    curve = [s["pearson"] for s in tenths]
    k = knee_index(curve, rise)
    knee_step = tenths[k]["step"] if k is not None else None
    call = val.plateau_step
    if knee_step is None:
        ok = call is None
    else:
        ok = call is not None and abs(call - knee_step) <= tolerance * knee_step
    at_call = next((s["pearson"] for s in scores if s["label"] == "plateau"), None)
    row = {"seed": seed, "steps": res.steps, "train_s": t_train, "train_cpu_s": cpu_train,
           "restore_s": t_restore,
           "val_s": val.seconds, "evaluations": len(val.values),
           "knee_tenth": k, "knee_step": knee_step, "plateau_step": call, "pass": ok,
           "pearson_knee": curve[k] if k is not None else None,
           "pearson_call": at_call, "pearson_end": curve[-1], "scores": scores,
           "val_steps": val.steps, "val_loss": val.values, "val_floor": val.floor}
    if diagnostics:
        row["diagnostics"] = snaps.diagnostics
        np.savez_compressed(out / f"val_outputs_seed{seed}.npz",
                            steps=np.array([d["step"] for d in snaps.diagnostics]),
                            outputs=np.stack(snaps.outputs),
                            targets=np.concatenate([b.targets[:, 0].numpy()
                                                    for b in val.batches]))
    done.write_text(json.dumps(row, default=float))
    return row


def rescore(row: dict, config: str | None, tolerance: float) -> dict:
    """`row` (a result JSON) with the plateau call of today's rule, applied to its stored
    validation curve: the call `train` would make on that curve (a run recorded under an
    earlier rule keeps its own call as ``plateau_step_recorded``)."""
    from cryowae.training.config import TrainConfig, load_config
    from cryowae.training.plateau import plateau_index

    settings = (load_config(config) if config else TrainConfig.from_dict(SMALL)).validation
    i = plateau_index(row["val_steps"], row["val_loss"], row["steps"], settings,
                      row.get("val_floor", 0.0))
    call = None if i is None else int(row["val_steps"][i])
    knee = row["knee_step"]
    ok = call is None if knee is None else (call is not None
                                            and abs(call - knee) <= tolerance * knee)
    if call != row["plateau_step"]:
        at = {s["step"]: s["pearson"] for s in row["scores"] if s["label"] != "plateau"}
        row |= {"plateau_step_recorded": row["plateau_step"], "plateau_step": call,
                "pass": ok, "pearson_call": at.get(call)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[61, 62, 63])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--config", default=None, help="YAML or preset [default: SMALL]")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--crop", type=int, default=96, help="Y and X of the central crop "
                    "restored and scored")
    ap.add_argument("--table-only", action="store_true", help="Print the table of the "
                    "finished seeds (result_seed*.json) without running, the plateau call "
                    "recomputed by today's rule from each stored validation curve")
    ap.add_argument("--rise", type=float, default=0.005)
    ap.add_argument("--tolerance", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=Path("bench_plateau_out"))
    ap.add_argument("--diagnostics", action="store_true", help="Also keep, at every "
                    "evaluation, the validation crops' restorations and the loss's "
                    "measured/wedge parts (val_outputs_seed<seed>.npz, the JSON)")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if a.table_only:
        rows = [rescore(json.loads((a.out / f"result_seed{s}.json").read_text()), a.config,
                        a.tolerance) for s in a.seeds]
    else:
        rows = [run_seed(a.out, s, a.steps, a.config, a.size, a.tile, a.crop, a.rise,
                         a.tolerance, a.diagnostics) for s in a.seeds]
    print()
    print("| seed | steps (CPU min) | Pearson per tenth (1..10) | knee (tenth, step) | "
          "plateau call (step) | within 20% | Pearson at call / end (last step's weights) | "
          "validation time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tenths = [s["pearson"] for s in r["scores"] if s["label"] != "plateau"]
        knee = "none" if r["knee_step"] is None else f"{r['knee_tenth'] + 1}, {r['knee_step']}"
        call = "none" if r["plateau_step"] is None else str(r["plateau_step"])
        if "plateau_step_recorded" in r:
            call += f" (recorded {r['plateau_step_recorded'] or 'none'})"
        at_call = "-" if r["pearson_call"] is None else f"{r['pearson_call']:.3f}"
        raw = [s.get("pearson_raw") for s in r["scores"] if s["label"] != "plateau"]
        raw_end = "-" if raw[-1] is None else f"{raw[-1]:.3f}"
        print(f"| {r['seed']} | {r['steps']} ({r['train_cpu_s'] / 60:.1f}) | "
              f"{' '.join(f'{p:.3f}' for p in tenths)} | "
              f"{knee} | {call} | {'yes' if r['pass'] else 'no'} | {at_call} / "
              f"{r['pearson_end']:.3f} ({raw_end}) | {100 * r['val_s'] / r['train_s']:.1f}% "
              f"({r['evaluations']} evaluations) |")
    print(f"\ncommand: OMP_NUM_THREADS=1 python benchmarks/bench_plateau.py --seeds "
          f"{' '.join(map(str, a.seeds))} --steps {a.steps} --size {a.size} --crop "
          f"{a.crop} --out {a.out}")


if __name__ == "__main__":
    main()
