"""The tile engine (`cryowae.tiling`): plans, settings, `run_tiles` with and without a core."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cryowae.errors import CryowaeInputError
from cryowae.models.protocol import ModelOnDevice
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.progress import ProgressReporter
from cryowae.tiling import TileRef, TileSettings, array_sink, model_tile_fn, run_tiles
from cryowae.tiling.plan import (
    plan_axis,
    plan_tiles,
    reflect_index,
    reflect_pad,
    tile_starts,
    weight_sum_1d,
    window_1d,
)


@pytest.mark.parametrize("size,tile,overlap", [(37, 16, 8), (50, 16, 8), (100, 96, 32),
                                               (257, 64, 16), (16, 16, 4), (9, 16, 8)])
def test_tile_starts_cover_with_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0
    if size > tile:
        assert starts[-1] == size - tile
        gaps = np.diff(starts)
        assert gaps.min() > 0 and gaps.max() <= tile - overlap
    else:
        assert starts == [0]


def test_windows_positive_and_peaked():
    for kind in ("cosine", "gaussian", "flat"):
        w = window_1d(16, kind)
        assert w.min() > 0 and w.max() == pytest.approx(1.0)
    w = window_1d(16, "cosine")
    assert w[0] < 0.02 and np.allclose(w, w[::-1])
    with pytest.raises(ValueError):
        window_1d(8, "hamming")


def test_reflect_index_matches_numpy_pad():
    a = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    np.testing.assert_array_equal(reflect_pad(a, [(2, 3), (1, 4), (3, 0)]),
                                  np.pad(a, [(2, 3), (1, 4), (3, 0)], mode="reflect"))
    assert reflect_index(np.arange(-20, 20), 3).tolist() == \
        [reflect_index([i], 3)[0] for i in range(-20, 20)]
    assert set(reflect_index(np.arange(-20, 20), 3)) == {0, 1, 2}
    assert reflect_index(np.arange(-3, 4), 1).tolist() == [0] * 7


def test_plan_axis_small_and_large():
    small = plan_axis(5, 32, 4, multiple=4)  # 5 + 2 * 2 voxels of padding -> 12
    assert small.tile == 12 and small.starts == (0,) and small.extent == 12
    big = plan_axis(100, 32, 8, multiple=8)
    assert big.pad_before == 4 and big.starts[-1] == big.extent - 32
    assert weight_sum_1d(big.extent, 32, big.starts).min() > 0
    plan = plan_tiles((37, 50, 45), 16, 8, 4)
    assert all(0 < e < s for ax, s in enumerate(plan.shape) for e in plan.edges(ax))


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("kw,needle", [
    (dict(tile=32, overlap=40), "--overlap 40 must be smaller than the tile (32)"),
    (dict(tile=0), "--tile must be positive"),
    (dict(overlap=-1), "--overlap must be >= 0"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(window="hann"), "--window 'hann'"),
    (dict(tile=32.5), "--tile must be a whole number"),
])
def test_tile_settings_refuse_bad_values(kw, needle):
    with pytest.raises(CryowaeInputError) as info:
        TileSettings(**kw)
    assert needle in str(info.value)


def test_tile_settings_round_and_plan():
    s = TileSettings(tile=14, overlap=4)
    assert s.resolved_tile(4) == 16 and "rounded up to 16" in s.rounding_note(4)
    assert s.rounding_note(2) is None
    plan = s.plan((30, 40, 50), 4)
    assert plan.tile == (16, 16, 16) and plan.shape == (30, 40, 50)
    with pytest.raises(CryowaeInputError, match="3D"):
        s.plan((30, 40), 4)


# --------------------------------------------------------------------------- engine


class Counter(ProgressReporter):
    pass


def _model() -> ModelOnDevice:
    """A real, non-identity restorer: each output voxel depends on the whole tile."""
    torch.manual_seed(0)
    model = WAERestorer(RestorerConfig(channels=4, depth=2, latent_dim=8))
    nn.init.normal_(model.head.weight, std=0.3)
    nn.init.normal_(model.head.bias, std=0.1)
    return ModelOnDevice(model.eval())


def _run(fn, data, plan, core=None, norm=(0.0, 1.0), batch_size=1, progress=None):
    if core is None:
        out, origin = np.zeros(plan.shape, np.float32), (0, 0, 0)
    else:
        out = np.zeros([c1 - c0 for c0, c1 in core], np.float32)
        origin = [c0 for c0, _ in core]
    run_tiles(fn, data, plan, array_sink(out, origin), norm=norm, device="cpu",
              batch_size=batch_size, progress=progress, core=core)
    return out


def test_core_equals_the_single_pass_exactly():
    """A core is restored from the whole volume's tiles that overlap it, bit for bit as
    the single pass (same batch size: one tile per forward pass)."""
    r = _model()
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(26, 34, 30)).astype(np.float32)
    plan = TileSettings(tile=16, overlap=6).plan(data.shape, r.model.multiple)
    fn = model_tile_fn(r)
    full = _run(fn, data, plan, norm=(3.0, 2.0))
    assert np.abs(full - data).max() > 0.5  # really not the identity
    for core in (((8, 19), (16, 34), (5, 30)), ((25, 26), (0, 1), (29, 30))):
        counter = Counter()
        got = _run(fn, data, plan, core=core, norm=(3.0, 2.0), progress=counter)
        want = full[tuple(slice(c0, c1) for c0, c1 in core)]
        np.testing.assert_array_equal(got, want)
        assert counter.done < plan.n_tiles  # only the tiles that touch the core


def test_tile_refs_crop_a_global_field_consistently():
    """A tile function that returns the crop of one field on the padded grid at
    ``ref.start`` reproduces that field: overlapping tiles agree, so blending keeps it
    (what a sampler's per-sample latent field relies on)."""
    shape = (23, 37, 30)
    plan = TileSettings(tile=12, overlap=4).plan(shape, 4)
    field = torch.from_numpy(np.random.default_rng(1).normal(
        size=plan.padded_shape).astype(np.float32))
    seen: list[TileRef] = []

    def fn(x: torch.Tensor, refs) -> torch.Tensor:
        seen.extend(refs)
        tz, ty, tx = plan.tile
        return torch.stack([field[z:z + tz, y:y + ty, w:w + tx] for z, y, w in
                            (r.start for r in refs)])[:, None]

    out = _run(fn, np.zeros(shape, np.float32), plan, batch_size=3)
    pads = [a.pad_before for a in plan.axes]
    real = field.numpy()[tuple(slice(p, p + n) for p, n in zip(pads, shape, strict=True))]
    np.testing.assert_allclose(out, real, rtol=0, atol=1e-5)
    assert len(seen) == plan.n_tiles
    assert len({r.index for r in seen}) == plan.n_tiles
    for r in seen:
        for a, ax in enumerate(plan.axes):
            assert r.start[a] == ax.starts[r.index[a]]
            assert r.real[a] == ax.real_range(r.start[a])


def test_streams_bounded_blocks_in_increasing_z():
    shape = (50, 20, 24)
    plan = TileSettings(tile=16, overlap=4).plan(shape, 4)
    got: list[tuple[slice, slice, slice]] = []

    def sink(where, block):
        assert block.shape == tuple(s.stop - s.start for s in where)
        got.append(where)

    data = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    run_tiles(lambda x, refs: x, data, plan, sink, norm=(0.0, 1.0), device="cpu",
              batch_size=2)
    zs = [(w[0].start, w[0].stop) for w in got]
    assert zs[0][0] == 0 and zs[-1][1] == 50
    assert all(a[1] == b[0] for a, b in zip(zs, zs[1:], strict=False))
    assert max(b - a for a, b in zs) <= plan.tile[0] and len(zs) > 2


def test_engine_refuses_bad_input_and_bad_tile_functions():
    plan = TileSettings(tile=8, overlap=2).plan((10, 10, 10), 4)
    data = np.ones((10, 10, 10), np.float32)
    with pytest.raises(ValueError, match="tile function returned shape"):
        _run(lambda x, refs: x[:, :, :4], data, plan)
    with pytest.raises(CryowaeInputError, match="produced NaN"):
        _run(lambda x, refs: x * float("nan"), data, plan)
    with pytest.raises(CryowaeInputError, match="does not match"):
        _run(lambda x, refs: x, data[:9], plan)
    with pytest.raises(CryowaeInputError, match="normalisation"):
        _run(lambda x, refs: x, data, plan, norm=(0.0, 0.0))
    with pytest.raises(CryowaeInputError, match="outside"):
        _run(lambda x, refs: x, data, plan, core=((0, 11), (0, 10), (0, 10)))
    bad = data.copy()
    bad[7, 1, 1] = np.inf
    with pytest.raises(CryowaeInputError, match="NaN or infinite voxels in slices"):
        run_tiles(lambda x, refs: x, bad, plan, array_sink(np.zeros_like(bad)),
                  norm=(0.0, 1.0), device="cpu", batch_size=2, check_finite=True)
