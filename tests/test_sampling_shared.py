"""Work a family shares across its samples and steps gives what computing it apart
gives: the branch's feature terms computed once (`StochasticRestorer.branch_terms`),
the centre taken from the sampling pass (`family_store.centre_from_pass`), all samples
in one pass, and crop restorations shared between the steps (`SharedRestoration`)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
import torch

from cryowae.inference.restore import restore_array
from cryowae.sampling import sample_file
from cryowae.sampling.family import CentreSink, plan_family, run_family
from cryowae.sampling.family_store import pass_gives_centre
from cryowae.sampling.restorations import SharedRestoration
from cryowae.tiling.engine import array_sink

from .test_family_storage import _tomo
from .test_sampling import _settings, _tomogram, stochastic_restorer


def _plain_branch(branch, features, z):
    """The branch as one convolution of each block's whole concatenated input."""
    h = branch.inp(torch.cat([features[0], z[0]], dim=1))
    for i, (up, block) in enumerate(zip(branch.up, branch.blocks, strict=True)):
        k = 2 ** (i + 1)
        coarse = z[0].repeat_interleave(k, 2).repeat_interleave(k, 3).repeat_interleave(k, 4)
        h = block(torch.cat([up(h), features[i + 1], coarse], dim=1))
    return branch.head(h)


def test_branch_terms_once_equal_the_concatenated_convolutions():
    m = stochastic_restorer(seed=3).stochastic
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, feats, _ = m.mean_and_features(x)
        z = m.draw_prior((16, 16, 16), 2, 3, torch.Generator().manual_seed(1))
        split = m.decode_branch(feats, z)
        terms = m.branch_terms(feats)
        one_by_one = torch.cat([m.decode_branch(feats, [v[:, s:s + 1] for v in z], terms)
                                for s in range(3)], dim=1)
        ref = torch.stack([_plain_branch(m.branch, feats, [v[:, s] for v in z])[:, 0]
                           for s in range(3)], dim=1)
    scale = float(ref.abs().max())
    assert scale > 0 and float(ref.std(dim=1).mean()) > 1e-3 * scale  # z matters
    # the same sums in another order: float32 rounding only
    assert torch.allclose(split, ref, rtol=0, atol=1e-5 * scale)
    assert torch.equal(one_by_one, split)  # shared terms or not: bit for bit


@pytest.mark.slow
def test_centre_from_the_sampling_pass_is_the_restoration_bit_for_bit():
    r = stochastic_restorer(seed=1)
    data = _tomogram((24, 40, 40))
    sampling = _settings(3, tile=16, overlap=8)
    fp = plan_family(r, data.shape, sampling)
    assert pass_gives_centre(fp, r, sampling.tiles, sampling.amp)
    # X = 36: the restoration starts its X tiles at 7, 14, ..., the pass at multiples
    # of 4, so its mean path's blend is not the restoration's
    assert not pass_gives_centre(plan_family(r, (24, 40, 36), sampling), r,
                                 sampling.tiles, sampling.amp)
    norm = (float(data.mean()), float(data.std()))
    centre = np.zeros(data.shape, np.float32)
    samples = np.zeros((3, *data.shape), np.float32)
    done = []
    run_family(fp, data, norm, lambda s: array_sink(samples[s]),
               centre=CentreSink(array_sink(centre), lambda: done.append(True)))
    restored = restore_array(r, data, 16, 8, sampling.tiles.batch_size, norm=norm)
    assert done == [True] and np.array_equal(centre, restored)
    # the samples are those of a pass without the centre, group by group
    alone = np.zeros_like(samples)
    fp2 = plan_family(r, data.shape, _settings(3, tile=16, overlap=8, group=1))
    run_family(fp2, data, norm, lambda s: array_sink(alone[s]))
    assert np.array_equal(samples, alone)
    assert float(np.abs(samples - restored).max()) > 1e-3 * float(np.abs(restored).max())


def test_shared_restoration_restores_the_kept_inputs_once():
    seen = []

    def restore(x):
        seen.append(x.copy())
        return 2.0 * x + 1.0

    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    b = a + 0.5
    shared = SharedRestoration(restore, keep=[a.astype(np.float64)])
    first = shared(a)
    first[0, 0, 0] = -99.0  # what a caller does with its copy stays its own
    again = shared(a.copy())
    assert np.array_equal(again, 2.0 * a + 1.0) and len(seen) == 1
    assert np.array_equal(shared(b), 2.0 * b + 1.0) and len(seen) == 2
    shared(a.astype(np.float64))  # the same values as float64: restored as float32
    assert (shared.calls, shared.hits, len(seen)) == (4, 2, 2)
    shared(b)  # not kept: restored again
    assert len(seen) == 3 and len(shared._kept) == 1


@pytest.mark.slow(seconds=40)  # two calibrated, localised, checked families
def test_sample_file_with_the_centre_from_the_pass_equals_the_separate_restoration(
        tmp_path, monkeypatch):
    """The family, its moments and every figure of family.json (calibration, local
    spread, self-check) are the same whether the centre comes out of the sampling pass
    or is restored on its own, with all samples in one pass or two at a time."""
    r, tomo = stochastic_restorer(seed=2), _tomo(tmp_path, (24, 40, 40))
    sampling = _settings(4)
    assert pass_gives_centre(plan_family(r, (24, 40, 40), sampling), r, sampling.tiles,
                             sampling.amp)
    fused = sample_file(r, tomo, tmp_path / "fused", sampling)
    import cryowae.sampling.files as files

    monkeypatch.setattr(files, "pass_gives_centre", lambda *a: False)
    apart = sample_file(r, tomo, tmp_path / "apart", _settings(4, group=2))
    for name in ("mean.mrc", "std.mrc"):
        with mrcfile.open(fused / name) as a, mrcfile.open(apart / name) as b:
            assert np.array_equal(a.data, b.data)
    ja, jb = (json.loads((d / "family.json").read_text()) for d in (fused, apart))
    assert ja["spread_calibration"]["centre"] == "restoration"
    for key in ("spread_calibration", "local_spread", "self_check", "voxel_std_relative",
                "consistency"):
        assert ja[key] == jb[key], key
    assert ja["samples_per_pass"] == 4 and jb["samples_per_pass"] == 2
