"""Spread recalibration experiment (issue 11): does per-shell scaling of a family's
spread about its mean calibrate it, and can the factors be found without ground truth?

Reads existing families (``samples.zarr`` of ``cryowae sample``) of bench_families runs
and scores each recalibration variant with the conventions of ``cryowae evaluate``
(`cryowae.sampling.evaluate`): truth = ground truth filtered by |CTF|, on the data's
scale; spread/skill in the measured and the wedge region; 90% coverage of all voxels
after a 30 A low-pass and of the wedge component. The ground truth is used for scoring
and for the oracle factors only.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_recalibration.py \
        --root /tmp/bfam --seeds 3 4 5 --out /tmp/brecal/results.json
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_family(sim: Path, fam: Path, halves: bool = False) -> dict[str, Any]:
    """A family directory's samples and geometry, the simulation's truth on the data's
    scale (|CTF|-filtered), its data and ground truth, and with `halves` its even/odd
    tomograms."""
    import zarr

    from cryowae.io import read_volume
    from cryowae.metrics.calibration_checks import truth_seen_by_data
    from cryowae.physics.geometry import TiltGeometry
    from cryowae.sampling.evaluate import truth_ctf, truth_on_data_scale

    meta = json.loads((fam / "family.json").read_text())
    geo = TiltGeometry.from_dict(meta["geometry"])
    samples = torch.from_numpy(np.asarray(
        zarr.open_array(str(fam / "samples.zarr" / "0"), mode="r")[:], dtype=np.float32))

    def vol(name: str) -> tuple[torch.Tensor, float]:
        with read_volume(sim / name) as v:
            return torch.from_numpy(v.numpy().astype(np.float32)), float(v.voxel_size)

    g, vs = vol("gt.mrc")
    d, _ = vol("tomo.mrc")
    params = truth_ctf(sim / "gt.mrc").params
    truth, _, _ = truth_on_data_scale(truth_seen_by_data(g, vs, params, "abs_ctf"), d, geo)
    out = {"samples": samples, "truth": truth, "data": d, "geometry": geo,
           "voxel_size": vs, "gt": g}
    if halves:
        out["even"], out["odd"] = vol("tomo_even.mrc")[0], vol("tomo_odd.mrc")[0]
    return out


def load_case(root: Path, seed: int, family: str, variant: str = "default"
              ) -> dict[str, Any]:
    """Family samples, truth on the data's scale, data, halves, geometry of one seed."""
    sim, run = root / f"sim_seed{seed}", root / f"run_seed{seed}_{variant}"
    return {**load_family(sim, run / family, halves=True),
            "model": run / "train" / "model.pt", "restored": run / "restored.mrc",
            "sim": sim}


def score(samples: torch.Tensor, truth: torch.Tensor, geo: Any, vs: float,
          case: dict[str, Any] | None = None) -> dict[str, float]:
    """The calibration figures of `cryowae evaluate` on an in-memory family; with the
    `case`: the family mean's Pearson and wedge CC against the ground truth (as
    bench_families scores the single restoration) and, per shell where the half-map FSC
    is above 0.5, whether the spread per coefficient is larger in the wedge."""
    from cryowae.metrics.calibration import (
        crps_ensemble,
        interval_coverage,
        spread_skill,
        wedge_coverage,
    )
    from cryowae.sampling.evaluate import LOWPASS_A, _lowpass

    ss = spread_skill(samples, truth, geo)
    cut = vs / LOWPASS_A
    cov = interval_coverage(_lowpass(samples, cut), _lowpass(truth, cut), (0.9,))
    wcov = wedge_coverage(samples, truth, geo, (0.9,))
    out = {"ss_measured": ss.ratio_measured, "ss_wedge": ss.ratio_wedge,
           "cov_all_90": cov[0.9], "cov_wedge_90": wcov[0.9],
           "crps": crps_ensemble(samples, truth)}
    if case is not None:
        from bench_families import half_map_fsc

        from cryowae.metrics.report import evaluate_volumes

        fam = evaluate_volumes(samples.mean(0), case["gt"], vs, geo)
        fsc, _ = half_map_fsc(case["sim"])
        good = np.zeros(len(ss.spread_wedge), bool)
        good[:len(fsc)] = fsc[:len(good)] > 0.5
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = ss.spread_wedge / ss.spread_measured
        from cryowae.metrics.calibration import shell_frequencies

        keep = good & np.isfinite(ratio)
        freq = shell_frequencies(tuple(samples.shape[1:]))[:len(ratio)]
        out["wedge_over_measured_by_shell"] = [[float(f), float(r)] for f, r in
                                               zip(freq[keep], ratio[keep], strict=True)]
        ratio = ratio[keep]
        out |= {"family_pearson": fam["pearson"], "family_cc_wedge": fam["cc_wedge"],
                "wedge_gt_measured": int((ratio > 1).sum()), "shells": int(ratio.size),
                "min_wedge_over_measured": float(ratio.min()) if ratio.size else None}
    return out


def shared_factors(f: Any) -> Any:
    """One factor per shell for both regions: the rms of the two regions' factors,
    weighted like their error (oracle variant without the region split)."""
    from cryowae.sampling.recalibrate import ShellFactors

    a = np.sqrt(0.5 * (f.measured**2 + f.wedge**2))
    return ShellFactors(f.frequency, a, a, f.source + " (shared)")


def restore_halves_separately(c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean restorations of the even and of the odd half (each on its own scale)."""
    from cryowae.inference.restore import restore_array
    from cryowae.models.checkpoint import load_restorer

    r = load_restorer(c["model"], "cpu")
    return tuple(torch.from_numpy(np.asarray(restore_array(r, c[k].numpy(), tile=64,
                                                             overlap=21)))
                 for k in ("even", "odd"))  # type: ignore[return-value]


def halves_error(restored_a: Any, half_b: Any, noise_half: np.ndarray,
                 noise_full: np.ndarray, geometry: Any
                 ) -> np.ndarray:
    """Per-shell squared error (measured region) of a restoration of the FULL tomogram,
    estimated from a restoration of half A against the independent half B (the
    rejected `halves` variant: it widened the families too little).

    ``E|r_A - b|^2 = E|r_A - t|^2 + N_half`` gives the half restoration's error
    e_h; read as a Wiener error (`wiener_error`) it fixes the signal power
    ``P = N_half e_h / (N_half - e_h)`` (inf when e_h >= N_half), and the full
    tomogram's error is ``P N_full / (P + N_full)``. Arrays per shell of
    `cryowae.physics.fourier.shell_index` of the volume's grid."""
    from cryowae.metrics.calibration_checks import halves_check
    from cryowae.sampling.recalibrate import wiener_error

    ra = torch.as_tensor(np.asarray(restored_a, dtype=np.float32))
    hc = halves_check(ra[None].expand(2, *ra.shape), half_b, noise_half, geometry)
    e_h = np.clip(np.nan_to_num(hc["observed"] - noise_half), 0.0, None)
    nh = np.asarray(noise_half, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(e_h < nh, nh * e_h / (nh - e_h), np.inf)
    return wiener_error(p, noise_full)


def data_factors(c: dict[str, Any], samples: torch.Tensor, method: str) -> Any:
    """Factors from data only, on the whole volume in memory: the measured-region error
    of the full restoration estimated per shell, over the family's measured spread,
    one factor per shell for both regions. ``halves``: the error of each half's mean
    restoration against the other half (`halves_error`); ``wiener_halves`` /
    ``wiener_est``: `shell_error_estimate` with / without the halves."""
    from cryowae.metrics.calibration import family_spread, shell_frequencies
    from cryowae.sampling.recalibrate import factors_from_data, shell_error_estimate
    from cryowae.training.noise import noise_from_halves

    geo = c["geometry"]
    spread = {"measured": family_spread(samples, geo).per_shell("measured")}
    if method == "halves":
        hn = noise_from_halves(c["even"], c["odd"], geo)
        if "r_even" not in c:
            c["r_even"], c["r_odd"] = restore_halves_separately(c)
        err = 0.5 * (halves_error(c["r_even"], c["odd"], hn.half.power, hn.full.power, geo)
                     + halves_error(c["r_odd"], c["even"], hn.half.power, hn.full.power,
                                    geo))
    else:
        halves = (c["even"], c["odd"]) if method == "wiener_halves" else (None, None)
        err, _ = shell_error_estimate(c["data"], geo, *halves)
    freq = shell_frequencies(tuple(samples.shape[1:]))
    return factors_from_data(spread["measured"], err, freq, method), err


def store_family(c: dict[str, Any], samples: torch.Tensor, mode: str,
                 work: Path, library: bool = True, wedge_floor: bool = True,
                 sure: bool = True) -> tuple[torch.Tensor, dict[str, Any]]:
    """The library path of ``cryowae sample``: `calibrate_store` on a zarr copy of the
    family (central-crop estimate, tiled filtering). `library`: as `sample_file` calls
    it (the stochastic restorer for the wedge ratio, centred on the single restoration);
    False: the factors alone about the family mean (the previous default)."""
    import shutil

    import zarr

    from cryowae.io import read_volume
    from cryowae.models.checkpoint import load_restorer
    from cryowae.sampling.store_calibration import calibrate_store

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    z = zarr.open_array(str(work / "s.zarr"), mode="w", shape=tuple(samples.shape),
                        chunks=(1, *(min(64, v) for v in samples.shape[1:])), dtype="f4")
    z[:] = samples.numpy()
    halves = (c["even"].numpy(), c["odd"].numpy()) if mode == "halves" else (None, None)
    kw: dict[str, Any] = {}
    if library:
        from cryowae.inference.restore import restore_array
        from cryowae.io.stats import volume_stats

        restorer = load_restorer(c["model"], "cpu")
        # the centre's function, as sample_file's
        restore = partial(restore_array, restorer, tile=64, overlap=21, batch_size=4,
                          norm=volume_stats(c["data"].numpy()))
        with read_volume(c["restored"]) as v:
            kw = {"model": restorer.stochastic, "centre": np.array(v.numpy(), np.float32)}
        if sure:
            kw["restore"] = restore
    rec = calibrate_store(z, c["data"].numpy(), c["geometry"], mode, {}, lambda: None, work,
                          *halves, wedge_floor=wedge_floor and library, **kw)
    out = torch.from_numpy(np.asarray(z[:]))
    shutil.rmtree(work, ignore_errors=True)
    return out, rec


def training_wedge_ratio(c: dict[str, Any], sim: Path, n_patches: int = 64,
                         patch: int = 32, n_samples: int = 8, seed: int = 0) -> Any:
    """gamma(k) = a_wedge / a_measured per shell from self-supervised patches of the
    halves: the library's `cryowae.sampling.wedge_ratio.wedge_ratio` (the `halves_gamma`
    rows of docs/benchmarks.md were measured with this script's first version of it,
    which took the noise from the whole halves and clipped gamma at 20). Returns
    (frequency, gamma, a_measured, a_extra)."""
    from cryowae.models.checkpoint import load_restorer
    from cryowae.sampling.wedge_ratio import wedge_ratio

    model = load_restorer(c["model"], "cpu").stochastic
    w = wedge_ratio(model, c["data"].numpy(), c["even"].numpy(), c["odd"].numpy(),
                    c["geometry"], patch=patch, n_patches=n_patches, n_samples=n_samples,
                    seed=seed)
    return w.frequency, w.gamma, w.a_measured, w.a_extra


def run_seed(root: Path, seed: int, family: str, methods: list[str],
             n_samples: int, variant: str = "default") -> dict[str, Any]:
    from cryowae.sampling.recalibrate import (
        ShellFactors,
        factors_from_truth,
        recalibrate_family,
    )

    c = load_case(root, seed, family, variant)
    samples = c["samples"][:n_samples]
    truth, geo, vs = c["truth"], c["geometry"], c["voxel_size"]
    from cryowae.io import read_volume
    from cryowae.metrics.report import evaluate_volumes

    with read_volume(c["restored"]) as v:
        single = evaluate_volumes(v.numpy(), c["gt"], vs, geo)
    out: dict[str, Any] = {"seed": seed, "variant": variant, "n_samples": int(samples.shape[0]),
                           "single": {"pearson": single["pearson"],
                                      "cc_wedge": single["cc_wedge"]},
                           "before": score(samples, truth, geo, vs, c)}
    oracle = factors_from_truth(samples, truth, geo)
    out["oracle_factors"] = oracle.to_dict()
    from cryowae.metrics.calibration import spread_skill

    ss = spread_skill(samples, truth, geo)
    out["oracle_error_measured"] = [float(v) for v in ss.error_measured]
    for m in methods:
        t0 = time.perf_counter()
        if m == "oracle":
            f = oracle
        elif m == "oracle_shared":
            f = shared_factors(oracle)
        elif m in ("halves", "wiener_halves", "wiener_est"):
            f, err = data_factors(c, samples, m)
            out.setdefault("error_estimates", {})[m] = [float(v) for v in err]
        elif m in ("halves_gamma", "data_gamma"):
            if "gamma" not in c:
                c["gamma"] = training_wedge_ratio(c, root / f"sim_seed{seed}")
                out["gamma"] = [[float(v) for v in arr] for arr in c["gamma"]]
            base, _ = data_factors(c, samples, "wiener_halves" if m == "halves_gamma"
                                   else "wiener_est")
            freq = c["gamma"][0]
            gamma = np.clip(np.nan_to_num(c["gamma"][1], nan=1.0, posinf=1.0), 0.0, 20.0)
            g = np.interp(base.frequency, freq, gamma)
            f = ShellFactors(base.frequency, base.measured, base.wedge * g, m)
        elif m.split("_")[0] in ("store", "previous", "nofloor", "wstore") and \
                m.split("_")[-1] in ("halves", "data") and m.count("_") == 1:
            # store: as cryowae sample; wstore: the same with the Wiener error in place
            # of SURE; nofloor: without the wedge floor; previous: factors alone about
            # the family mean
            rec, info = store_family(c, samples, m.split("_")[1],
                                     Path(f"/tmp/brecal/work_{root.name}_{variant}_{seed}"),
                                     library=not m.startswith("previous"),
                                     wedge_floor=not m.startswith("nofloor"),
                                     sure=not m.startswith("wstore"))
            out[m] = score(rec, truth, geo, vs, c) | {"calibration": info,
                                                      "seconds": time.perf_counter() - t0}
            continue
        else:
            raise SystemExit(f"unknown method {m}")
        rec = recalibrate_family(samples, f, geo)
        out[m] = score(rec, truth, geo, vs) | {"factors": f.to_dict(),
                                               "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/bfam"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--family", default="family_nohalves")
    ap.add_argument("--variant", default="default",
                    help="the bench_families run to read (run_seed<N>_<variant>)")
    ap.add_argument("--methods", nargs="+",
                    default=["oracle", "store_halves", "store_data", "previous_halves",
                             "previous_data"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("/tmp/brecal/results.json"))
    a = ap.parse_args()
    results = []
    for seed in a.seeds:
        r = run_seed(a.root, seed, a.family, a.methods, a.samples, a.variant)
        results.append(r)
        line = " | ".join(f"{k}: " + ", ".join(f"{n} {v:.2f}" for n, v in r[k].items()
                                                if n in ("ss_measured", "ss_wedge",
                                                         "cov_wedge_90", "cov_all_90"))
                          for k in ("before", *a.methods))
        print(f"seed {seed}: {line}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown_table(results, ["before", *a.methods]))


def markdown_table(results: list[dict[str, Any]], rows: list[str]) -> str:
    """One row per seed and variant: spread/skill, 90% coverage, CRPS and, where
    scored, the family mean beside the single restoration and the wedge > measured
    shells."""
    lines = ["| seed | variant | spread/skill measured / wedge | 90% cover wedge / all (30 A)"
             " | CRPS | family mean Pearson / wedge CC (single) | wedge > measured (shells) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        sg = r.get("single") or {}
        for k in rows:
            v = r[k]
            fam = (f"{v['family_pearson']:.3f} / {v['family_cc_wedge']:.3f} "
                   f"({sg.get('pearson', float('nan')):.3f} / "
                   f"{sg.get('cc_wedge', float('nan')):.3f})"
                   if "family_pearson" in v else "")
            wm = f"{v['wedge_gt_measured']}/{v['shells']}" if "shells" in v else ""
            lines.append(f"| {r['seed']} | {k} | {v['ss_measured']:.2f} / {v['ss_wedge']:.2f}"
                         f" | {v['cov_wedge_90']:.2f} / {v['cov_all_90']:.2f} | "
                         f"{v['crps']:.4f} | {fam} | {wm} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
