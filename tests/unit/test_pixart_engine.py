"""Engine invariants on a tiny PixArt transformer (the cross-attention DiT backbone).

masked ≡ sliced on random hard vectors (blocks dropped, layers losing every unit), analytic ≡
counted MACs, keep-all ≡ original, save → load ≡ identity, sliced weights are the teacher's kept
rows / columns, and the real PixArt-α XL-2-1024 config on the meta device.
"""

from __future__ import annotations

import torch
import pytest
from torch.testing import assert_close

from aptp.engine.backbones import backbone_for
from aptp.engine.baselines import weight_norm_vector
from aptp.engine.expert import load_expert, save_expert
from aptp.engine.gates import Gates
from aptp.engine.macs import build_macs_model, count_macs
from aptp.engine.slicing import slice_model
from aptp.engine.space import ArchSpace, build_space

TEXT = 7


def tiny_pixart(sample_size: int = 8, additional: bool = False, layers: int = 3):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=layers, attention_head_dim=12, num_attention_heads=4, in_channels=4,
        out_channels=8, caption_channels=16, cross_attention_dim=48, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000, patch_size=2, use_additional_conditions=additional).eval()
    for p in m.parameters():  # stock init zeroes the output layers: draw everything so units matter
        p.data.normal_(0, 0.2)
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_pixart()


@pytest.fixture(scope="module")
def space(model):
    return build_space(model, ffn_groups=8)


@pytest.fixture(scope="module")
def inputs(model):
    bb = backbone_for(model)
    x, t, c = bb.dummy_inputs(model.config, (8, 8), TEXT, batch=2, device="cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x.shape, generator=g)
    c.encoder_hidden_states = torch.randn(c.encoder_hidden_states.shape, generator=g)
    c.extra["encoder_attention_mask"][1, 5:] = 0  # a padded prompt
    return x, torch.tensor([10, 700]), c


def vectors(space: ArchSpace, n: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        v = (torch.rand(space.size, generator=g) > 0.35).float()
        seg = space.segments[i % len(space.segments)]
        if i % 3 == 0:  # a layer (or, for a depth segment, a block) loses every unit
            v[seg.offset : seg.stop] = 0
        out.append(v)
    return out


def run(model, x, t, c):
    with torch.no_grad():
        return backbone_for(model).forward(model, x, t, c)


def test_units(space):
    assert space.meta["backbone"] == "pixart"
    assert space.by_kind() == {"self_attn_heads": 12, "cross_attn_heads": 12, "ffn_channels": 24, "depth": 3}
    assert all(s.block.startswith("transformer_blocks.") for s in space.segments)


def test_gates_off_and_all_ones_equal_the_model(model, space, inputs):
    x, t, c = inputs
    ref = run(model, x, t, c)
    gates = Gates(model, space)
    try:
        with gates.apply(torch.ones(space.size)):
            ones = run(model, x, t, c)
        with gates.apply(torch.zeros(space.size)), gates.off():
            off = run(model, x, t, c)
    finally:
        gates.remove()
    assert torch.equal(ones, ref) and torch.equal(off, ref)


def test_masked_equals_sliced_and_macs(model, space, inputs):
    x, t, c = inputs
    macs = build_macs_model(model, space, 8, TEXT)
    assert macs.full == count_macs(model, 8, TEXT)
    gates = Gates(model, space)
    ref = run(model, x, t, c)
    changed = 0
    try:
        for v in vectors(space):
            with gates.apply(v):
                masked = run(model, x, t, c)
            expert, plan = slice_model(model, space, v)
            sliced = run(expert, x, t, c)
            scale = masked.abs().max().clamp_min(1e-6)
            assert float((masked - sliced).abs().max() / scale) < 1e-5
            assert float(macs(v)[0]) == pytest.approx(count_macs(expert, 8, TEXT), rel=1e-9)
            changed += not torch.allclose(masked, ref)
    finally:
        gates.remove()
    assert changed >= 20  # the vectors really prune


def test_keep_all_is_the_original_and_weights_are_the_teachers(model, space, inputs):
    x, t, c = inputs
    full, plan = slice_model(model, space, torch.ones(space.size))
    assert plan.ops == [] and torch.equal(run(full, x, t, c), run(model, x, t, c))
    v = torch.ones(space.size)
    heads = next(s for s in space.segments if s.kind == "cross_attn_heads")
    ffn = next(s for s in space.segments if s.kind == "ffn_channels")
    v[heads.offset + 1] = 0
    v[ffn.offset : ffn.offset + 3] = 0
    expert, _ = slice_model(model, space, v)
    a, b = model.get_submodule(heads.module), expert.get_submodule(heads.module)
    keep = [i for h in (0, 2, 3) for i in range(h * 12, (h + 1) * 12)]
    assert b.heads == 3 and torch.equal(b.to_k.weight, a.to_k.weight[keep])
    assert torch.equal(b.to_out[0].weight, a.to_out[0].weight[:, keep])
    fa, fb = model.get_submodule(ffn.module), expert.get_submodule(ffn.module)
    w = ffn.unit_width
    assert torch.equal(fb.net[2].weight, fa.net[2].weight[:, 3 * w :])
    assert torch.equal(fb.net[0].proj.bias, fa.net[0].proj.bias[3 * w :])


def test_save_load_identity(model, space, inputs, tmp_path):
    x, t, c = inputs
    v = vectors(space)[4]
    expert, plan = slice_model(model, space, v)
    save_expert(expert, plan, tmp_path / "e")
    back = load_expert(tmp_path / "e")
    assert type(back).__name__ == "PixArtTransformer2DModel"
    sb, se = back.state_dict(), expert.state_dict()
    assert sb.keys() == se.keys() and all(torch.equal(sb[k], se[k]) for k in sb)  # bit for bit
    # outputs to float32 rounding: MKL may round a GEMM differently at another memory alignment
    assert_close(run(back, x, t, c), run(expert, x, t, c), atol=1e-5, rtol=1e-5)


def test_size_conditions_and_weight_norm():
    """PixArt-α 1024's resolution / aspect-ratio embedding (``use_additional_conditions``)."""
    m = tiny_pixart(sample_size=128, additional=True, layers=2)
    sp = build_space(m, ffn_groups=8)
    macs = build_macs_model(m, sp, 8, TEXT)
    assert macs.full == count_macs(m, 8, TEXT)
    v = weight_norm_vector(m, sp, macs, 0.7)
    assert 0.6 < float(macs.ratio(v)[0]) <= 0.7
    bb = backbone_for(m)
    x, t, c = bb.dummy_inputs(m.config, (8, 8), TEXT, batch=1, device="cpu")
    assert set(c.added_cond_kwargs) == {"resolution", "aspect_ratio"}
    x = torch.randn(x.shape)
    gates = Gates(m, sp)
    try:
        with gates.apply(v):
            masked = run(m, x, t, c)
    finally:
        gates.remove()
    expert, _ = slice_model(m, sp, v)
    assert torch.allclose(masked, run(expert, x, t, c), atol=1e-5)


def test_real_pixart_alpha_config_on_meta():
    from aptp.models.registry import build_unet, resolve_model

    m = build_unet(resolve_model("pixart-alpha"))
    assert sum(p.numel() for p in m.parameters()) == 611_349_152
    sp = build_space(m)
    assert sp.by_kind() == {"self_attn_heads": 448, "cross_attn_heads": 448, "ffn_channels": 896, "depth": 28}
    macs = build_macs_model(m, sp, 128, 120)
    counted = count_macs(m, 128, 120)
    assert macs.full == pytest.approx(counted, rel=1e-9)
    assert counted / 1e9 == pytest.approx(3254.76, abs=0.01)


def test_block_macs_equal_the_count_per_block(model, space):
    """Per-block MACs (inspect-experts' block plot) of a pruned PixArt equal FlopCounterMode's."""
    from aptp.analysis.blocks import BlockMacs, counted_block_macs

    v = vectors(space)[5]
    bm = BlockMacs(model, space, 8, TEXT)
    assert bm.blocks[:3] == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2"]
    expert, _ = slice_model(model, space, v)
    counted = counted_block_macs(expert, 8, TEXT)
    for b, m in bm(v).items():
        assert m == pytest.approx(counted[b], rel=1e-9, abs=1e-6)
