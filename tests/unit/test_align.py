"""Hardware-aligned slicing: kept channels rounded to kernel-friendly multiples within the MACs."""

from __future__ import annotations

import pytest
import torch

from aptp.engine.align import align_vector, aligned_fraction
from aptp.engine.macs import build_macs_model
from aptp.engine.slicing import slice_unet
from aptp.engine.space import build_space
from tests.conftest import make_tiny_unet


@pytest.fixture(scope="module")
def setup():
    unet = make_tiny_unet()
    space = build_space(unet)
    return unet, space, build_macs_model(unet, space, 8, text_len=7)


def random_vector(space, seed, p=0.6):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(space.size, generator=g) < p).float()
    v[space.depth_mask().bool()] = 1
    return v


@pytest.mark.parametrize("seed", range(6))
def test_aligned_vector_keeps_the_budget_and_aligns_every_layer_it_can(setup, seed):
    unet, space, macs = setup
    v = random_vector(space, seed)
    multiple = 16  # tiny U-Net units are 2-8 channels: steps of 2-8 units
    before = aligned_fraction(space, v, multiple)
    a = align_vector(space, v, macs, multiple)
    assert float(macs.ratio(a)[0]) <= float(macs.ratio(v)[0]) + 1e-9
    assert aligned_fraction(space, a, multiple) >= max(0.75, before + 0.2)
    free = align_vector(space, v, macs, multiple, budget=1.0)  # no budget pressure: all aligned
    assert aligned_fraction(space, free, multiple) == 1.0
    for s in space.segments:  # no live layer was removed by the rounding
        if s.kind != "depth" and v[s.offset:s.stop].sum() > 0:
            assert a[s.offset:s.stop].sum() > 0
    # the aligned vector slices into a working model whose channel counts are multiples
    sliced, _ = slice_unet(unet, space, free)
    for s in space.segments:
        if s.kind == "resnet_channels":
            k = int(free[s.offset:s.stop].sum())
            assert sliced.get_submodule(s.module).conv1.out_channels == k * s.unit_width
            assert k == s.size or (k * s.unit_width) % multiple == 0


def test_align_prefers_high_scores_and_is_identity_for_multiple_one(setup):
    unet, space, macs = setup
    v = random_vector(space, 7)
    assert torch.equal(align_vector(space, v, macs, 1), v)
    seg = next(s for s in space.segments if s.kind == "resnet_channels")
    multiple = 2 * seg.unit_width
    scores = torch.arange(space.size, dtype=torch.float64)  # later units more important
    a = align_vector(space, v, macs, multiple, budget=1.0, scores=scores)
    k = int(a[seg.offset:seg.stop].sum())
    assert torch.equal(a[seg.stop - k:seg.stop], torch.ones(k))  # the top-scored units are kept
    with pytest.raises(ValueError):
        align_vector(space, v, macs, 0)
