"""How much wider, relative to the measured region, a family must be in the wedge:
the self-supervised wedge ratio gamma(k) of the spread recalibration (issue 11).

The data cannot show the error of a restoration inside the missing wedge, but they can
show how well the model restores a wedge it was *made* to miss: the training task
itself. Patches are rotated and given an extra wedge exactly as in training
(`cryowae.training.augment.make_batch`): with the halves, input = one half, target =
the other; without them, input and target = the tomogram. For every rfft coefficient
of a patch, in two regions:

- ``extra``: measured in the target, removed from the input (a wedge the model fills);
- ``measured``: measured in both,

the mean's squared error against the target, minus the target's noise power, is summed
per resolution shell, beside the family's predictive spread ``(m + 1) / m`` x the
unbiased variance of `m` samples. In the extra wedge the target's noise is independent
of the input (the other half, or coefficients the input lacks). In the measured region
without the halves, input and target share the noise, so the error there is SURE's
(`cryowae.sampling.sure`: residual - noise + 2 x the divergence of the mean path,
from one probe per patch). ``a_region(k)^2 = error / spread`` and ``gamma(k) = a_extra
/ a_measured``: the factor by which the wedge's spread factor must exceed the measured
region's. The target's noise is estimated on its central crop without the halves
(`cryowae.training.slab_noise.crop_noise`: the empty Z slabs of the crop's column, else
the ramp fit `noise_without_halves`): the even/odd difference also holds signal from
0.13 to 0.26 cycles per voxel (even and odd tilts see different directions beyond a
half's Crowther limit; up to 1.9x the exact noise of a simulation there), which made
gamma undefined (1) in those shells.

Measured (docs/benchmarks.md, "Spread recalibration"): a first version of this
(noise from the whole halves, gamma capped at 20) took the wedge's spread/skill of
seeds 3-6 from 0.98, 0.83, 1.02, 0.75 to 1.14, 0.95, 1.17, 0.94; the version with the
halves' difference as noise, with the centring and the wedge floor of `cryowae
sample`, gave 0.89, 1.17, 0.94, 1.19 on seeds 6-9 (0.75, 1.06, 0.84, 1.10 without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryowae.physics.geometry import TiltGeometry

#: largest gamma applied (the measured values of the benchmark models were below 3.7)
MAX_GAMMA = 4.0


@dataclass
class WedgeRatio:
    """gamma per shell: ``frequency`` (n,) cycles per voxel of the patch grid,
    ``gamma`` (n,), the two regions' factors it came from and the patches used (0:
    gamma 1 everywhere, e.g. a volume too small for a rotated patch)."""

    frequency: np.ndarray
    gamma: np.ndarray
    a_measured: np.ndarray
    a_extra: np.ndarray
    patches: int

    def at(self, frequency: np.ndarray) -> np.ndarray:
        """gamma at other shell frequencies (linear interpolation, end values beyond)."""
        return np.interp(np.asarray(frequency, dtype=np.float64), self.frequency, self.gamma)

    def to_dict(self) -> dict[str, Any]:
        return {"frequency": [float(v) for v in self.frequency],
                "gamma": [float(v) for v in self.gamma],
                "a_measured": [float(v) for v in np.nan_to_num(self.a_measured)],
                "a_extra": [float(v) for v in np.nan_to_num(self.a_extra)],
                "patches": int(self.patches)}


@torch.no_grad()
def wedge_ratio(model: Any, data: Any, even: Any, odd: Any, geometry: TiltGeometry,
                patch: int = 32, n_patches: int = 64, n_samples: int = 8,
                seed: int = 0) -> WedgeRatio:
    """gamma(k) of a stochastic restorer on one tomogram (module docstring).

    Parameters
    ----------
    model
        A `cryowae.models.stochastic.StochasticRestorer` (on the CPU or a device).
    data, even, odd
        (Z, Y, X) tomogram and its halves (arrays or memmaps; patches are read); halves
        None: the tomogram is input and target (module docstring).
    geometry
        The tomogram's tilt geometry.
    patch, n_patches, n_samples
        Patch edge (voxels; lowered, in multiples of the model's, until a rotated patch
        fits the volume), patches drawn (4 per batch) and samples per patch. Measured
        without the halves on one benchmark model (docs/benchmarks.md, "second run"):
        with 8 or 16 samples gamma changed by about 10% with the generator seed; with
        4 it came out higher (up to 40% at 0.16-0.22 cycles per voxel with seed 0),
        which took that seed's wedge spread/skill from 1.08 to 1.33.
    seed
        Seeds the patch positions, rotations and latent draws: the result is
        reproducible.
    """
    from cryowae.io.stats import volume_stats
    from cryowae.metrics.calibration import SpectralGrid, predictive_spread, shell_frequencies
    from cryowae.physics.crop import central_box
    from cryowae.physics.fourier import radial_frequency
    from cryowae.sampling.consistency import CHECK_EDGE
    from cryowae.sampling.sure import EPSILON, probe_divergence, sure_error
    from cryowae.training.augment import make_batch
    from cryowae.training.data import (
        SubtomogramSampler,
        TomogramSource,
        rotation_crop_size,
        structure_map,
    )
    from cryowae.training.noise import draw_noise
    from cryowae.training.slab_noise import crop_noise

    halves = even is not None and odd is not None
    multiple = int(getattr(model, "multiple", 1))
    # the largest patch (a multiple of the model's) whose rotated crop fits the volume
    patch = int(patch) - int(patch) % multiple
    while patch > multiple and rotation_crop_size(patch) > min(np.shape(data)):
        patch -= multiple
    if rotation_crop_size(patch) > min(np.shape(data)) or patch < 2 * multiple:
        one = np.ones(2)
        return WedgeRatio(np.array([0.0, 0.5]), one, one * np.nan, one * np.nan, 0)
    src = TomogramSource(name="tomogram", full=data, even=even, odd=odd)
    for which in ("full", "even", "odd") if halves else ("full",):
        src.stats[which] = volume_stats(getattr(src, which))
    src.structure = structure_map(data)
    sampler = SubtomogramSampler([src], patch, seed=seed)
    # the target's noise power (the other half, or the tomogram itself) on its central
    # crop (at most 96^3, its column all Z planes: bounded memory); not the even/odd
    # difference, which also holds signal at 0.13-0.26 cycles per voxel (module docstring)
    target = even if halves else data
    std = 0.5 * (src.stats["even"][1] + src.stats["odd"][1]) if halves \
        else src.stats["full"][1]
    crop = central_box(np.shape(target), CHECK_EDGE, even=True)
    noise = crop_noise(target, crop, geometry).scaled(1.0 / std**2)
    shape = (patch, patch, patch)
    grid = SpectralGrid.of(shape, geometry)  # shells and Hermitian multiplicities
    n_target = noise.at(radial_frequency(shape, rfft=True)).double()
    # per region: error sums, spread sums, squared per-patch error sums (for the error's
    # standard error over patches)
    sums = {k: np.zeros((3, grid.n_shells)) for k in ("measured", "extra")}
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    dims = (-3, -2, -1)
    done = used = 0
    while done < n_patches:
        inputs, targets = sampler.sample(4)  # halves: one half in, the other out
        b = make_batch(inputs, targets, patch, geometry, device, generator=gen)
        mean, samples, _ = model(b.inputs, n_samples=n_samples, generator=gen)
        fm = torch.fft.rfftn(mean[:, 0].double().cpu(), dim=dims, norm="ortho")
        ft = torch.fft.rfftn(b.targets[:, 0].double().cpu(), dim=dims, norm="ortho")
        fs = torch.fft.rfftn(samples.double().cpu(), dim=dims, norm="ortho")
        var = (fs - fs.mean(1, keepdim=True)).abs().square().sum(1) / (n_samples - 1)
        spread = predictive_spread(var, n_samples)
        residual = (fm - ft).abs().square()
        err = residual - n_target
        m_in = b.input_measured.bool().cpu()
        if not halves:
            # input and target share the noise where both are measured: the error there
            # is SURE's (cryowae.sampling.sure), residual - N + 2 divergence, the
            # divergence from one probe with the noise's spectrum
            probe = draw_noise(noise, shape, batch=err.shape[0], generator=gen,
                               measured=m_in)[:, 0]
            moved = model.mean(b.inputs + EPSILON * probe[:, None].to(device))[0]
            fmp = torch.fft.rfftn(moved[:, 0].double().cpu(), dim=dims, norm="ortho")
            fp = torch.fft.rfftn(probe.double(), dim=dims, norm="ortho")
            div = probe_divergence(fp, fmp, fm, EPSILON)
            err = torch.where(m_in, sure_error(residual, n_target, div), err)
        m_tg = b.target_measured.bool().cpu()
        # patches (nearly) inside the data: a rotated patch larger than the volume's
        # crop has empty corners, where the target is no measurement
        inside = b.valid.cpu().flatten(1).mean(dim=1) > 0.95
        for i in range(err.shape[0]):
            if not bool(inside[i]):
                continue
            used += 1
            for name, region in (("measured", m_in & m_tg[i]), ("extra", ~m_in & m_tg[i])):
                e = grid.shell_sums(err[i], region)
                sums[name][0] += e
                sums[name][1] += grid.shell_sums(spread[i], region)
                sums[name][2] += e * e
        done += 4
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        a = {k: np.sqrt(np.clip(v[0], 0.0, None) / v[1]) for k, v in sums.items()}
        gamma = a["extra"] / a["measured"]
        # standard error of the measured region's summed error over the patches
        n = max(used, 2)
        m = sums["measured"]
        se = np.sqrt(np.clip(n / (n - 1) * (m[2] - m[0] ** 2 / n), 0.0, None))
    # a shell whose measured-region error is not above the noise by two standard errors
    # (or that holds no coefficient) says nothing: gamma 1 (without the halves SURE's
    # error at 0.24-0.26 cycles per voxel was the small difference of large terms and
    # gave gamma 3 where the truth's ratio was 1.4: seed 12). One whose wedge error is
    # not above the noise while the measured region's is gets gamma 0 (the model
    # restores that wedge shell better than the noise can show), as measured
    gamma = np.where(m[0] > 2.0 * se, gamma, 1.0)
    gamma = np.clip(np.nan_to_num(gamma, nan=1.0, posinf=1.0), 0.0, MAX_GAMMA)
    return WedgeRatio(shell_frequencies(shape), gamma, a["measured"], a["extra"], used)


__all__ = ["MAX_GAMMA", "WedgeRatio", "wedge_ratio"]
