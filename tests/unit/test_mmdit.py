"""The MMDiT backbones (aptp/engine/backbones/sd3.py, flux.py, mmdit.py) on tiny random
``SD3Transformer2DModel`` / ``FluxTransformer2DModel``s: unit counts, masked ≡ sliced, analytic ≡
counted MACs, keep-all and gates-off ≡ the original, sliced weights = the teacher's rows /
columns, expert save → load, weight-norm baseline, one pipeline step, and the real SD3-medium /
FLUX.1-dev configs on the meta device."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch
from torch.testing import assert_close

from aptp.engine.backbones import backbone_for
from aptp.engine.gates import Gates
from aptp.engine.macs import build_macs_model, count_macs
from aptp.engine.slicing import slice_model
from aptp.engine.space import build_space

LAT, TEXT, GROUPS = 8, 7, 4  # latent 8×8 (SD3: 16 patches of 2×2; Flux: 16 packed tokens), 7 text tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _randomize(model, std=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def tiny(name: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if name == "sd3":  # 3 joint blocks, the last context_pre_only
        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    elif name == "sd35":  # SD3.5-medium layout: dual attention in the first blocks, RMS q/k norms
        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=24, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0, 1), qk_norm="rms_norm")
    else:  # 2 double + 2 single blocks; rope axes sum to the head dim
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=24,
                                   pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    return _randomize(m)


def inputs(model, batch=2, seed=1):
    bb = backbone_for(model)
    x, t, c = bb.dummy_inputs(model.config, (LAT, LAT), TEXT, batch=batch, device="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x.shape, generator=g)
    c.encoder_hidden_states.copy_(torch.randn(c.encoder_hidden_states.shape, generator=g))
    c.extra["pooled_projections"].copy_(torch.randn(c.extra["pooled_projections"].shape, generator=g))
    t = torch.tensor([30.0, 700.0])[:batch]  # σ·1000
    return x, t, c


def run(model, x, t, c):
    with torch.no_grad():
        return backbone_for(model).forward(model, x, t, c)


def vectors(space, n=24, seed=0):
    """Hard vectors: all ones, every width segment emptied, every other segment emptied, every
    block dropped, then random ones with emptied segments and dropped blocks."""
    g = torch.Generator().manual_seed(seed)
    width = [s for s in space.segments if s.kind != "depth"]
    depth = [s for s in space.segments if s.kind == "depth"]
    out = [torch.ones(space.size)]
    v = torch.ones(space.size)
    for s in width:
        v[s.offset : s.stop] = 0
    out.append(v)
    for parity in (0, 1):
        v = torch.ones(space.size)
        for i, s in enumerate(width):
            if i % 2 == parity:
                v[s.offset : s.stop] = 0
        out.append(v)
    v = torch.ones(space.size)
    for s in depth:
        v[s.offset] = 0
    out.append(v)
    while len(out) < n:
        v = (torch.rand(space.size, generator=g) > 0.35).float()
        for s in width:
            if torch.rand(1, generator=g) < 0.25:
                v[s.offset : s.stop] = 0
        for s in depth:
            v[s.offset] = float(torch.rand(1, generator=g) > 0.25)
        out.append(v)
    return out


MODELS = ("sd3", "sd35", "flux")


@pytest.mark.parametrize("name, counts, n_segments", [
    # SD3: 3 blocks × 4 heads; ff in 3 blocks + ff_context in the first 2, 4 groups each; 3 blocks
    ("sd3", {"joint_attn_heads": 12, "self_attn_heads": 0, "ffn_channels": 20, "depth": 3}, 3 + 5 + 3),
    ("sd35", {"joint_attn_heads": 12, "self_attn_heads": 8, "ffn_channels": 20, "depth": 3}, 3 + 2 + 5 + 3),
    # Flux: (2 double + 2 single) × 4 heads; ff + ff_context of 2 double blocks and 2 single MLPs
    ("flux", {"joint_attn_heads": 16, "ffn_channels": 24, "depth": 4}, 2 * 3 + 2 * 2 + 4),
])
def test_space_counts(name, counts, n_segments):
    m = tiny(name)
    sp = build_space(m, ffn_groups=GROUPS)
    assert sp.by_kind() == counts
    assert len(sp.segments) == n_segments
    assert sp.meta["backbone"] == ("flux" if name == "flux" else "sd3")
    bb = backbone_for(m)
    ops = {s.plan_op for s in sp.segments}
    if name == "flux":
        assert ops == {"joint_heads", "ffn_channels", "single_heads", "single_mlp", "skip"}
        single = [s for s in sp.segments if s.module == "single_transformer_blocks.0"]
        assert [s.plan_op for s in single] == ["single_heads", "single_mlp", "skip"]
        targets = [bb.gate_targets(m, s) for s in single[:2]]
        blk = m.single_transformer_blocks[0]
        assert targets == [[(blk.proj_out, 0)], [(blk.proj_out, blk.attn.inner_dim)]]
    else:
        last = f"transformer_blocks.{len(m.transformer_blocks) - 1}"
        assert not any(s.module == f"{last}.ff_context" for s in sp.segments)  # context_pre_only
        joint = [s for s in sp.segments if s.kind == "joint_attn_heads"]
        assert [len(bb.gate_targets(m, s)) for s in joint] == [2, 2, 1]  # to_out[0] (+ to_add_out)
    # depth units: every block; the width units of a block sit under its gate
    for s in sp.segments:
        if s.kind != "depth":
            assert sp.segments[s.depth_segment].module == s.block
    assert len(build_space(m, ffn_groups=GROUPS, depth_policy="none").segments) == n_segments - counts["depth"]


@pytest.mark.parametrize("name", MODELS)
def test_masked_equals_sliced_and_macs_analytic_equals_counted(name):
    m = tiny(name)
    sp = build_space(m, ffn_groups=GROUPS)
    x, t, c = inputs(m)
    ref = run(m, x, t, c)
    macs = build_macs_model(m, sp, LAT, TEXT)
    assert macs.full == pytest.approx(count_macs(m, LAT, TEXT), rel=1e-9)
    gates = Gates(m, sp)
    bb = backbone_for(m)
    for i, v in enumerate(vectors(sp)):
        with torch.no_grad(), gates.apply(v.expand(2, -1)):
            masked = bb.forward(m, x, t, c)
        sliced, plan = slice_model(m, sp, v)
        out = run(sliced, x, t, c)
        scale = float(masked.abs().max())
        assert float((masked - out).abs().max()) <= 1e-5 * scale, (i, plan.ops)
        counted = count_macs(sliced, LAT, TEXT)
        assert counted == pytest.approx(float(macs(v)[0]), rel=1e-6), (i, plan.ops)
        if i == 0:
            assert torch.equal(masked, ref)
    # the teacher is untouched by slicing copies and by gates that are off
    gates.remove()
    assert torch.equal(run(m, x, t, c), ref)


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_and_gates_off_are_the_original(name):
    m = tiny(name)
    sp = build_space(m, ffn_groups=GROUPS)
    x, t, c = inputs(m)
    ref = run(m, x, t, c)
    sliced, plan = slice_model(m, sp, sp.full_vector())
    assert plan.ops == []
    assert torch.equal(run(sliced, x, t, c), ref)
    gates = Gates(m, sp)
    assert torch.equal(run(m, x, t, c), ref)  # no vector set
    with gates.apply(torch.zeros(2, sp.size)):
        with gates.off():
            assert torch.equal(run(m, x, t, c), ref)
        assert not torch.equal(run(m, x, t, c), ref)
    with gates.apply(sp.full_vector().expand(2, -1)):
        assert torch.equal(run(m, x, t, c), ref)


def _plan_vector(sp, keep: dict[str, list[int]], drop: tuple[str, ...] = ()):
    v = sp.full_vector()
    for s in sp.segments:
        key = f"{s.module}:{s.plan_op}"
        if key in keep:
            v[s.offset : s.stop] = 0
            v[[s.offset + k for k in keep[key]]] = 1
        if s.kind == "depth" and s.module in drop:
            v[s.offset] = 0
    return v


def test_sd3_sliced_weights_are_the_teachers():
    from aptp.engine.backbones.mmdit import JointConstantOutput, SkippedJointBlock

    m = tiny("sd35")
    sp = build_space(m, ffn_groups=GROUPS)
    v = _plan_vector(sp, {"transformer_blocks.0.attn:joint_heads": [0, 2],
                          "transformer_blocks.2.attn:joint_heads": [3],
                          "transformer_blocks.0.attn2:heads": [1],
                          "transformer_blocks.0.ff_context:ffn_channels": [1, 3],
                          "transformer_blocks.1.attn:joint_heads": []})
    e, plan = slice_model(m, sp, v)
    a, b = m.transformer_blocks[0].attn, e.transformer_blocks[0].attn
    rows = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert torch.equal(getattr(b, n).weight, getattr(a, n).weight[rows])
        assert torch.equal(getattr(b, n).bias, getattr(a, n).bias[rows])
    assert torch.equal(b.to_out[0].weight, a.to_out[0].weight[:, rows])
    assert torch.equal(b.to_out[0].bias, a.to_out[0].bias)
    assert torch.equal(b.to_add_out.weight, a.to_add_out.weight[:, rows])
    assert (b.heads, b.inner_dim, b.norm_q.weight.shape[0]) == (2, 16, 8)  # per-head q/k norms stay
    last = e.transformer_blocks[2].attn  # context_pre_only: no to_add_out, add_q/k/v rows still go
    assert last.to_add_out is None and last.add_k_proj.weight.shape == (8, 32)
    assert torch.equal(last.add_v_proj.weight, m.transformer_blocks[2].attn.add_v_proj.weight[24:32])
    a2 = e.transformer_blocks[0].attn2
    assert torch.equal(a2.to_q.weight, m.transformer_blocks[0].attn2.to_q.weight[8:16]) and a2.heads == 1
    ffc, ffc0 = e.transformer_blocks[0].ff_context, m.transformer_blocks[0].ff_context
    ch = torch.cat([torch.arange(32, 64), torch.arange(96, 128)])  # 128 inner channels, 4 groups of 32
    assert torch.equal(ffc.net[0].proj.weight, ffc0.net[0].proj.weight[ch])
    assert torch.equal(ffc.net[2].weight, ffc0.net[2].weight[:, ch])
    empty = e.transformer_blocks[1].attn
    assert isinstance(empty, JointConstantOutput)
    assert torch.equal(empty.to_out.bias, m.transformer_blocks[1].attn.to_out[0].bias)
    assert torch.equal(empty.to_add_out.bias, m.transformer_blocks[1].attn.to_add_out.bias)
    # skipped blocks: both streams pass through, the last block's text stream is None
    e2, _ = slice_model(m, sp, _plan_vector(sp, {}, drop=("transformer_blocks.1", "transformer_blocks.2")))
    assert isinstance(e2.transformer_blocks[2], SkippedJointBlock) and e2.transformer_blocks[2].context_pre_only
    h, enc = torch.randn(1, 4, 32), torch.randn(1, 3, 32)
    assert e2.transformer_blocks[2](hidden_states=h, encoder_hidden_states=enc, temb=None) == (None, h)
    out = e2.transformer_blocks[1](h, enc, None, None)
    assert out[0] is enc and out[1] is h


def test_flux_sliced_weights_are_the_teachers_in_either_order():
    from aptp.engine.backbones.flux import NoChannels, NoHeads, slice_single_heads, slice_single_mlp
    from aptp.engine.slicers import ConstantOutput

    m = tiny("flux")
    blk = m.single_transformer_blocks[0]
    inner, mlp = blk.attn.inner_dim, blk.mlp_hidden_dim  # 32, 128
    heads, groups = [1, 3], [0, 2]
    ch = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])
    mch = torch.cat([torch.arange(0, 32), torch.arange(64, 96)])
    cols = torch.cat([ch, inner + mch])
    for order in ("heads first", "mlp first"):
        b = copy.deepcopy(blk)
        if order == "heads first":
            slice_single_heads(b, heads, 8)
            slice_single_mlp(b, groups, mlp // 4)
        else:
            slice_single_mlp(b, groups, mlp // 4)
            slice_single_heads(b, heads, 8)
        for n in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(b.attn, n).weight, getattr(blk.attn, n).weight[ch])
        assert (b.attn.heads, b.attn.inner_dim, b.attn.head_dim) == (2, 16, 8)
        assert torch.equal(b.proj_mlp.weight, blk.proj_mlp.weight[mch])
        assert torch.equal(b.proj_out.weight, blk.proj_out.weight[:, cols])
        assert torch.equal(b.proj_out.bias, blk.proj_out.bias)
        assert b.proj_out._tp_packed_row_blocks == [16, 64] and b.mlp_hidden_dim == 64
    # a single block losing every head and every channel still runs: proj_out gives its bias
    for order in ((slice_single_heads, slice_single_mlp), (slice_single_mlp, slice_single_heads)):
        b = copy.deepcopy(blk)
        for fn in order:
            fn(b, [], 8 if fn is slice_single_heads else mlp // 4)
        assert isinstance(b.attn, NoHeads) and isinstance(b.proj_mlp, NoChannels)
        assert isinstance(b.proj_out, ConstantOutput)
    b = copy.deepcopy(blk)
    slice_single_heads(b, [], 8)
    assert torch.equal(b.proj_out.weight, blk.proj_out.weight[:, inner:])
    # double blocks: joint heads in both streams
    sp = build_space(m, ffn_groups=GROUPS)
    e, _ = slice_model(m, sp, _plan_vector(sp, {"transformer_blocks.1.attn:joint_heads": [2]}))
    a, b = m.transformer_blocks[1].attn, e.transformer_blocks[1].attn
    for n in ("to_q", "add_k_proj", "add_v_proj"):
        assert torch.equal(getattr(b, n).weight, getattr(a, n).weight[16:24])
    assert torch.equal(b.to_add_out.weight, a.to_add_out.weight[:, 16:24]) and b.heads == 1 and b.inner_dim == 8


@pytest.mark.parametrize("name", MODELS)
def test_expert_save_load_is_identity(name, tmp_path):
    from aptp.engine.expert import load_expert, save_expert

    m = tiny(name)
    sp = build_space(m, ffn_groups=GROUPS)
    x, t, c = inputs(m)
    for k, v in enumerate(vectors(sp, n=8, seed=3)[1:]):
        e, plan = slice_model(m, sp, v)
        save_expert(e, plan, tmp_path / f"e{k}")
        loaded = load_expert(tmp_path / f"e{k}")
        sl, se = loaded.state_dict(), e.state_dict()
        assert sl.keys() == se.keys() and all(torch.equal(sl[k], se[k]) for k in sl), plan.ops
        # outputs to float32 rounding: MKL may round a GEMM differently at another memory alignment
        assert_close(run(loaded, x, t, c), run(e, x, t, c), atol=1e-5, rtol=1e-5)
        assert type(loaded).__name__ == type(m).__name__


@pytest.mark.parametrize("name", MODELS)
def test_weight_norm_vector_and_distill_blocks(name):
    from aptp.engine.baselines import unit_l1_norms, weight_norm_vector
    from aptp.train.distill import capture_blocks

    m = tiny(name)
    sp = build_space(m, ffn_groups=GROUPS)
    macs = build_macs_model(m, sp, LAT, TEXT)
    norms = unit_l1_norms(m, sp)
    assert bool(torch.isfinite(norms[~sp.depth_mask()]).all()) and bool((norms[~sp.depth_mask()] > 0).all())
    v = weight_norm_vector(m, sp, macs, 0.6)
    assert float(macs.ratio(v)[0]) <= 0.6 and bool(v[sp.depth_mask()].eq(1).all())
    e, _ = slice_model(m, sp, v)
    x, t, c = inputs(m)
    assert run(e, x, t, c).shape == x.shape
    n_blocks = len(m.transformer_blocks) + len(getattr(m, "single_transformer_blocks", []))
    with capture_blocks(m) as outs:
        run(m, x, t, c)
    tokens = (LAT // 2) ** 2
    assert len(outs) == n_blocks and all(o.shape[:2] == (2, tokens) for o in outs)  # the image stream


def test_flux_packing_and_initial_latents():
    from aptp.engine.backbones.flux import FluxBackbone, latent_image_ids, pack_latents, unpack_latents
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 6, 10)
    p = pack_latents(x)
    assert torch.equal(p, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    assert torch.equal(unpack_latents(p, 6, 10), x)
    assert torch.equal(unpack_latents(p, 6, 10), FluxPipeline._unpack_latents(p, 48, 80, 8))
    assert torch.equal(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    bb = FluxBackbone()
    cfg = {"in_channels": 64}
    z = bb.initial_latents(cfg, 7, 1024, 768, 8)
    g = torch.Generator().manual_seed(7)
    assert z.shape == (1, 64 * 48, 64)
    assert torch.equal(unpack_latents(z, 128, 96), torch.randn(1, 16, 128, 96, generator=g))
    assert bb.latent_channels(cfg) == 16 and bb.native_size(cfg, 8) == 1024


def test_unsupported_layouts_are_one_line_errors():
    from aptp.engine.backbones import UnsupportedModelError

    m = tiny("flux")
    with pytest.raises(UnsupportedModelError, match="patch_size=2"):
        backbone_for(m).check_config({**m.config, "patch_size": 2}, "flux")
    m.transformer_blocks[0].attn.fuse_projections()
    with pytest.raises(UnsupportedModelError, match="transformer_blocks.0.attn: fused"):
        build_space(m)
    s = tiny("sd3")
    with pytest.raises(UnsupportedModelError, match="qk_norm='rms_norm_across_heads'"):
        backbone_for(s).check_config({**s.config, "qk_norm": "rms_norm_across_heads"}, "sd3")


def _capture_first_call(pipe, **kwargs):
    seen = []

    def hook(module, args, kw, out):
        seen.append((kw, out))
    h = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(**kwargs)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_step_matches_the_stock_pipeline(family, tmp_path):
    """encode_prompts + forward (σ·1000, unpacked latent) give the pipeline's first transformer
    call; initial_latents is the pipeline's own draw of the seed; text_len / call_kwargs agree."""
    import diffusers

    from tests import tiny_dits

    make = tiny_dits.make_tiny_sd3_dir if family == "sd3" else tiny_dits.make_tiny_flux_dir
    info = make(tmp_path / family, randomize_std=0.1)
    pipe = getattr(diffusers, info.pipeline).from_pretrained(info.path)
    pipe.set_progress_bar_config(disable=True)
    bb = backbone_for(pipe.transformer)
    n = bb.text_len(pipe)
    assert n == info.text_len and bb.call_kwargs(pipe, n) == {"max_sequence_length": info.max_sequence_length}
    prompts = ["a red circle left of a blue square", "a green triangle"]
    seed = 5
    lat = torch.cat([bb.initial_latents(pipe.transformer.config, seed + i, info.height, info.width,
                                        int(pipe.vae_scale_factor)) for i in range(2)])
    extra = {"guidance_scale": 1.0} if family == "sd3" else {}  # SD3: no CFG half
    common = dict(prompt=prompts, num_inference_steps=2, output_type="latent", height=info.height, width=info.width,
                  **bb.call_kwargs(pipe, n), **extra)
    kw, out = _capture_first_call(pipe, latents=lat, **common)
    # the seed's latents are what the pipeline draws itself from a generator of that seed
    kw1, _ = _capture_first_call(pipe, generator=[torch.Generator().manual_seed(seed + i) for i in range(2)], **common)
    assert torch.equal(kw1["hidden_states"], kw["hidden_states"])
    cond = bb.encode_prompts(pipe, prompts, (info.height, info.width), n)
    assert torch.equal(cond.encoder_hidden_states, kw["encoder_hidden_states"])
    assert torch.equal(cond.extra["pooled_projections"], kw["pooled_projections"])
    pred = out[0]
    if family == "flux":
        from aptp.engine.backbones.flux import unpack_latents

        h, w = info.latent_shape[1:]
        sample, t = unpack_latents(kw["hidden_states"], h, w), kw["timestep"] * 1000
        assert torch.equal(cond.extra["guidance"], kw["guidance"])
        pred = unpack_latents(pred, h, w)
    else:
        sample, t = kw["hidden_states"], kw["timestep"]
    mine = run(pipe.transformer, sample, t, cond)
    assert mine.shape == (2, *info.latent_shape)
    assert float((mine - pred).abs().max()) <= 1e-5 * float(pred.abs().max())


REAL = [("sd3-medium-transformer.json", 2_028_328_000, 4452.17,
         {"joint_attn_heads": 576, "self_attn_heads": 0, "ffn_channels": 1504, "depth": 24}),
        ("flux1-dev-transformer.json", 11_901_408_320, 37192.33,
         {"joint_attn_heads": 1368, "ffn_channels": 2432, "depth": 57})]


@pytest.mark.parametrize("name, params, gmacs, counts", REAL)
def test_real_configs_on_meta(name, params, gmacs, counts):
    """1024 px (latent 128; Flux packs it to 64 × 64 tokens), the MACs convention's text length
    (SD3: 77 + 256; Flux: 512), 32 FFN groups: analytic ≡ counted, full and one random expert."""
    path = resources.files("aptp.models") / "configs" / name
    cfg = json.loads(path.read_text())
    bb = backbone_for(cfg)
    m = bb.build(cfg, "meta")
    assert sum(p.numel() for p in m.parameters()) == params
    sp = build_space(m, ffn_groups=32)
    assert sp.by_kind() == counts
    macs = build_macs_model(m, sp, 128, bb.default_text_len)
    counted = count_macs(m, 128, bb.default_text_len)
    print(f"{name}: {params:,} params, units {sp.by_kind()}, analytic {macs.full / 1e9:,.2f} GMACs, "
          f"counted {counted / 1e9:,.2f} GMACs")
    assert macs.full == pytest.approx(counted, rel=1e-9)
    assert macs.full / 1e9 == pytest.approx(gmacs, abs=0.01)
    v = vectors(sp, n=6, seed=11)[-1]
    e, _ = slice_model(m, sp, v)
    assert count_macs(e, 128, bb.default_text_len) == pytest.approx(float(macs(v)[0]), rel=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_soft_gates_give_every_entry_a_gradient(name):
    m = tiny(name).train()
    sp = build_space(m, ffn_groups=GROUPS)
    x, t, c = inputs(m)
    v = torch.full((2, sp.size), 0.7, requires_grad=True)
    gates = Gates(m, sp)
    with gates.apply(v):
        out = backbone_for(m).forward(m, x, t, c)
    out.square().mean().backward()
    assert bool((v.grad.abs() > 0).all())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_block_macs_equal_the_count_per_block(family):
    """Per-block MACs (inspect-experts' block plot) of a pruned MMDiT equal FlopCounterMode's."""
    from aptp.analysis.blocks import BlockMacs, block_names, counted_block_macs

    model, space, latent, text_len = _block_macs_case(family)
    names = block_names(model)
    assert names[0] == "transformer_blocks.0" and all("." in n for n in names)
    v = torch.ones(space.size)
    v[::3] = 0
    bm = BlockMacs(model, space, latent, text_len)
    expert, _ = slice_model(model, space, v)
    counted = counted_block_macs(expert, latent, text_len)
    for b, m in bm(v).items():
        assert m == pytest.approx(counted[b], rel=1e-9, abs=1e-6)


def _block_macs_case(family):
    model = tiny(family)
    return model, build_space(model, ffn_groups=4), LAT, TEXT
