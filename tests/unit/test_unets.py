"""Engine invariants on tiny SD 1.5- and SDXL-shaped U-Nets (masked ≡ sliced, analytic ≡ counted
MACs, keep-all ≡ original, save → load ≡ identity, nested depth units of multi-block
transformers), the real sd1.5 / sdxl configs on the meta device, and unsupported U-Nets refused."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from aptp.engine.expert import load_expert, save_expert
from aptp.engine.gates import UNetGates
from aptp.engine.macs import build_macs_model, count_macs
from aptp.engine.slicing import SkippedTransformer, SkippedTransformerBlock, slice_unet
from aptp.engine.space import ArchSpace, UnsupportedUNetError, build_space, check_unet_config
from aptp.models.conditioning import Conditioning, unet_forward
from tests.conftest import TINY_UNET, make_tiny_unet

LATENT = 8
TEXT = 7

# SD 1.5's layout: SD 2.1's blocks, an int attention_head_dim (= 8 heads at full size), conv proj_in
TINY_SD15 = dict(attention_head_dim=2, use_linear_projection=False, upcast_attention=False)
# SDXL's layout: 3 levels, no attention at the first, 1 / 2 / 3 (SDXL: 1 / 2 / 10) transformer
# blocks per Transformer2DModel, text_time added conditioning (pooled 16 + 6 time ids × 8)
TINY_SDXL = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 2, 4),
    transformer_layers_per_block=(1, 2, 3),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    upcast_attention=False,
)
SHAPES = {"sd1.5": TINY_SD15, "sdxl": TINY_SDXL}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def inputs(name: str, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    t = torch.tensor([10, 400, 900][:batch])
    c = torch.randn(batch, TEXT, 32, generator=g)
    if name != "sdxl":
        return x, t, Conditioning(c)
    added = {"text_embeds": torch.randn(batch, 16, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(batch, 1)}
    return x, t, Conditioning(c, added)


def _tiny(name: str):
    unet = make_tiny_unet(**SHAPES[name])
    space = build_space(unet, ffn_groups=8)
    return name, unet, space, build_macs_model(unet, space, LATENT, text_len=TEXT)


@pytest.fixture(scope="module", params=["sd1.5", "sdxl"])
def model(request):
    return _tiny(request.param)


@pytest.fixture(scope="module")
def sd15_model():
    return _tiny("sd1.5")


@pytest.fixture(scope="module")
def sdxl_model():
    return _tiny("sdxl")


def random_vectors(space: ArchSpace, n: int = 12, seed: int = 1) -> list[torch.Tensor]:
    """Hard vectors keeping 0.15..0.95 of the units; depth gates are kept with probability 0.7
    so nested inner blocks are skipped both inside kept and inside skipped transformers."""
    g = torch.Generator("cpu").manual_seed(seed)
    depth = space.depth_mask()
    out = []
    for i in range(n):
        v = (torch.rand(space.size, generator=g) < 0.15 + 0.8 * i / (n - 1)).float()
        v[depth] = (torch.rand(int(depth.sum()), generator=g) < 0.7).float()
        out.append(v)
    inner = torch.tensor([s.offset for s in space.segments if s.kind == "depth" and ".transformer_blocks." in s.module],
                         dtype=torch.long)
    only_inner = torch.ones(space.size)
    if inner.numel():
        only_inner[inner] = 0  # every inner block skipped, every transformer kept
    only_outer = torch.ones(space.size)
    only_outer[depth] = 0
    if inner.numel():
        only_outer[inner] = 1  # every outer block skipped, their inner gates open
    return out + [only_inner, only_outer, torch.zeros(space.size)]


def run(unet, name, batch: int = 3):
    with torch.no_grad():
        return unet_forward(unet, *inputs(name, batch))


def test_tiny_sdxl_space_nests_inner_blocks():
    unet = make_tiny_unet(**TINY_SDXL)
    space = build_space(unet, ffn_groups=8)
    depth = {s.module: s for s in space.segments if s.kind == "depth"}
    # outer: down 0 resnet; down 1, 2 resnet + attention; up 0, 1 resnet + attention; up 2 resnet
    outer = [m for m in depth if ".transformer_blocks." not in m]
    assert len(outer) == 10
    # inner: down 1: 2×2, down 2: 2×3, mid: 3, up 0: 3×3, up 1: 3×2
    inner = [m for m in depth if ".transformer_blocks." in m]
    assert len(inner) == 4 + 6 + 3 + 9 + 6
    seg = depth["down_blocks.2.attentions.1.transformer_blocks.2"]
    assert space.segments[seg.depth_segment].module == "down_blocks.2.attentions.1"
    assert depth["down_blocks.2.attentions.0.transformer_blocks.0"].depth_segment == -1
    ff = next(s for s in space.segments if s.module == "down_blocks.2.attentions.1.transformer_blocks.2.ff")
    assert space.gate_chain(ff) == [seg.offset, depth["down_blocks.2.attentions.1"].offset]
    assert ArchSpace.from_dict(space.to_dict()).segments == space.segments


def test_tiny_sd15_space_has_no_inner_units(sd15_model):
    name, unet, space, _ = sd15_model
    # one BasicTransformerBlock per Transformer2DModel: the paper's 14 depth units, nothing nested
    assert space.by_kind() == {"resnet_channels": 176, "self_attn_heads": 32, "cross_attn_heads": 32,
                               "ffn_channels": 128, "depth": 14}
    assert all(".transformer_blocks." not in s.module for s in space.segments if s.kind == "depth")
    assert all(s.depth_segment == -1 for s in space.segments if s.kind == "depth")


def test_gates_all_ones_are_the_original(model):
    name, unet, space, _ = model
    gates = UNetGates(unet, space)
    try:
        ref = run(unet, name)
        with gates.apply(torch.ones(3, space.size)):
            ones = run(unet, name)
    finally:
        gates.remove()
    assert torch.equal(ref, ones)


def test_masked_equals_sliced_and_macs_match(model):
    name, unet, space, macs = model
    gates = UNetGates(unet, space)
    try:
        for i, v in enumerate(random_vectors(space)):
            with gates.apply(v):
                masked = run(unet, name)
            sliced, plan = slice_unet(unet, space, v)
            assert_close(run(sliced, name), masked, atol=1e-5, rtol=1e-5, msg=lambda m: f"vector {i}: {m}")
            analytic, counted = float(macs(v)[0]), count_macs(sliced, LATENT, text_len=TEXT)
            assert abs(analytic - counted) <= 1e-6 * counted, (i, analytic, counted)
    finally:
        gates.remove()


def test_skipped_inner_blocks_are_identities(sdxl_model):
    name, unet, space, _ = sdxl_model
    v = random_vectors(space)[-3]  # every inner block skipped
    sliced, plan = slice_unet(unet, space, v)
    assert isinstance(sliced.down_blocks[2].attentions[1].transformer_blocks[2], SkippedTransformerBlock)
    assert isinstance(sliced.mid_block.attentions[0].transformer_blocks[0], SkippedTransformerBlock)
    # an outer skip wins: no op for the inner blocks of a skipped transformer
    v = random_vectors(space)[-2]
    sliced, plan = slice_unet(unet, space, v)
    assert isinstance(sliced.down_blocks[2].attentions[1], SkippedTransformer)
    assert not any(op["module"].startswith("down_blocks.2.attentions.1.") for op in plan.ops)


def test_soft_nested_macs_are_products_of_gates(model):
    name, _, space, macs = model
    v = torch.full((1, space.size), 0.5, dtype=torch.float64)
    coef = macs.coefficients()
    expected = macs.c0 + sum(float(coef[s.offset : s.stop].sum()) * 0.5 ** (1 + len(space.gate_chain(s)))
                             for s in space.segments)
    assert abs(float(macs(v)[0]) - expected) <= 1e-9 * expected
    assert abs(macs.full - count_macs(make_tiny_unet(**SHAPES[name]), LATENT, text_len=TEXT)) < 1e-3


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])]


def test_keep_all_and_save_load_identity(model, tmp_path):
    """Keep-all and save → load give the very same weights (bit for bit) and outputs. The outputs
    are compared to float32 rounding, not bit for bit: MKL's GEMM may round differently for the same
    numbers at another memory alignment (seen on an AVX2-only EPYC: 1 ulp in one Linear, 1.6e-6
    at the output), and a loaded copy's weights live at other addresses."""
    name, unet, space, _ = model
    sliced, plan = slice_unet(unet, space, torch.ones(space.size))
    assert plan.ops == []
    _same_weights(sliced, unet)
    assert_close(run(sliced, name), run(unet, name), atol=1e-5, rtol=1e-5)
    v = random_vectors(space, seed=5)[6]
    sliced, plan = slice_unet(unet, space, v)
    loaded = load_expert(save_expert(sliced, plan, tmp_path / "expert-0"))
    _same_weights(loaded, sliced)
    assert_close(run(loaded, name), run(sliced, name), atol=1e-5, rtol=1e-5)


def test_block_macs_sum_to_counted_on_a_nested_expert(model):
    from aptp.analysis.blocks import BlockMacs, counted_block_macs

    name, unet, space, _ = model
    v = random_vectors(space, seed=9)[7]
    bm = BlockMacs(unet, space, LATENT, TEXT)(v)
    counted = counted_block_macs(slice_unet(unet, space, v)[0], LATENT, TEXT)
    for b, m in counted.items():
        assert abs(bm[b] - m) <= 1e-6 * max(m, 1.0), (b, bm[b], m)


@pytest.mark.parametrize("alias,params,units,depth,latent,gmacs", [
    ("sd1.5", 859_520_964, 1486, 14, 64, 401.64),
    ("sdxl", 2_567_463_684, 5464, 80, 128, 3380.62),
])
def test_real_configs_on_meta(alias, params, units, depth, latent, gmacs):
    from aptp.models.registry import build_unet, resolve_model

    unet = build_unet(resolve_model(alias))
    assert sum(p.numel() for p in unet.parameters()) == params
    space = build_space(unet)
    assert space.size == units and space.by_kind()["depth"] == depth
    m = build_macs_model(unet, space, latent)
    counted = count_macs(unet, latent)
    assert abs(m.full - counted) <= 1e-9 * counted and abs(counted / 1e9 - gmacs) < 0.01
    small = build_macs_model(unet, space, 16)  # a random nested vector, counted at a small latent
    v = random_vectors(space, n=4, seed=3)[2]
    sliced, _ = slice_unet(unet, space, v)  # meta: nothing copied
    c = count_macs(sliced, 16)
    assert abs(float(small(v)[0]) - c) <= 1e-6 * c


def test_non_geglu_feed_forward_is_refused():
    from diffusers.models.activations import GELU

    unet = make_tiny_unet(randomize=False)
    ff = unet.down_blocks[0].attentions[0].transformer_blocks[0].ff
    ff.net[0] = GELU(32, 128)
    with pytest.raises(UnsupportedUNetError, match="down_blocks.0.attentions.0.transformer_blocks.0.ff: a GELU"):
        build_space(unet)


UNSUPPORTED = {
    "unknown down block": ({"down_block_types": ["SimpleCrossAttnDownBlock2D"] + list(TINY_UNET["down_block_types"][1:])},
                           "down block type 'SimpleCrossAttnDownBlock2D'"),
    "inpainting": ({"in_channels": 9}, "in_channels=9 != out_channels=4"),
    "class-conditioned": ({"class_embed_type": "timestep"}, "class conditioning"),
    "unknown mid block": ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "mid block type"),
    "image added conditioning": ({"addition_embed_type": "image"}, "addition_embed_type='image'"),
    "not a UNet2DConditionModel": ({"_class_name": "UNet2DModel"}, "a UNet2DModel is not supported"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_configs_are_one_line(case):
    change, needle = UNSUPPORTED[case]
    cfg = {"_class_name": "UNet2DConditionModel", **TINY_UNET, **change}
    with pytest.raises(UnsupportedUNetError, match=needle) as exc:
        check_unet_config(cfg, "--model X")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("--model X: ")


def test_supported_configs_pass():
    from aptp.models.registry import resolve_model, unet_config

    for alias in ("toy", "sd2.1", "sd1.5", "sdxl"):
        check_unet_config(unet_config(resolve_model(alias)))
    check_unet_config({**TINY_UNET, **TINY_SDXL})
