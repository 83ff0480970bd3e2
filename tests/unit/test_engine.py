"""Engine invariants on tiny SD-2.1-shaped U-Nets: masked ≡ sliced, analytic ≡ counted MACs,
keep-all ≡ original, save → load ≡ identity, sliced weights = the teacher's kept rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from aptp.engine.expert import load_expert, read_plan, save_expert
from aptp.engine.gates import UNetGates
from aptp.engine.macs import build_macs_model, count_macs
from aptp.engine.slicing import ConstantOutput, SkippedResnet, SkippedTransformer, ZeroWidthResnet, slice_unet
from aptp.engine.space import ArchSpace, build_space
from tests.conftest import make_tiny_unet

LATENT = 8


@pytest.fixture(scope="module")
def space(tiny_unet):
    return build_space(tiny_unet, ffn_groups=8)


@pytest.fixture(scope="module")
def macs(tiny_unet, space):
    return build_macs_model(tiny_unet, space, LATENT, text_len=7)


def random_vectors(space: ArchSpace, n: int = 24, seed: int = 1) -> list[torch.Tensor]:
    """Hard vectors with keep probabilities from 0.15 to 0.95, so whole layers vanish too."""
    g = torch.Generator("cpu").manual_seed(seed)
    vectors = []
    for i in range(n):
        p = 0.15 + 0.8 * i / (n - 1)
        v = (torch.rand(space.size, generator=g) < p).float()
        vectors.append(v)
    depth = space.depth_mask()
    all_depth_off = torch.ones(space.size)
    all_depth_off[depth] = 0
    width_off = torch.zeros(space.size)
    width_off[depth] = 1
    vectors += [all_depth_off, width_off, torch.zeros(space.size)]
    return vectors


def test_space_counts_and_order(tiny_unet, space):
    kinds = space.by_kind()
    # 22 ResBlocks × 8 groups; heads: down 2·(2+2+4), mid 4, up 3·(4+2+2); depth 3·2+1+1+3·2
    assert kinds == {"resnet_channels": 176, "self_attn_heads": 44, "cross_attn_heads": 44,
                     "ffn_channels": 128, "depth": 14}
    assert space.size == sum(kinds.values())
    offsets = [s.offset for s in space.segments]
    assert offsets == sorted(offsets) and space.segments[0].offset == 0
    assert all(s.kind == "depth" for s in space.segments[-14:])
    # only last resnet/transformer of down/up blocks are skippable
    depth_modules = [s.module for s in space.segments if s.kind == "depth"]
    assert "down_blocks.0.resnets.1" in depth_modules and "down_blocks.0.resnets.0" not in depth_modules
    assert "up_blocks.1.resnets.2" in depth_modules and "up_blocks.1.attentions.2" in depth_modules
    assert not any(m.startswith("mid_block") for m in depth_modules)


def test_space_json_round_trip(space, tmp_path):
    space.save(tmp_path / "arch_space.json")
    again = ArchSpace.load(tmp_path / "arch_space.json")
    assert again.segments == space.segments and again.size == space.size
    assert json.loads((tmp_path / "arch_space.json").read_text())["size"] == space.size


def test_gates_all_ones_and_off_are_bit_identical(tiny_unet, space, tiny_inputs):
    gates = UNetGates(tiny_unet, space)
    try:
        with torch.no_grad():
            ref = tiny_unet(*tiny_inputs).sample
            with gates.apply(torch.ones(3, space.size)):
                ones = tiny_unet(*tiny_inputs).sample
                with gates.off():
                    off = tiny_unet(*tiny_inputs).sample
            after = tiny_unet(*tiny_inputs).sample
    finally:
        gates.remove()
    assert torch.equal(ref, ones) and torch.equal(ref, off) and torch.equal(ref, after)


def test_masked_equals_sliced_and_macs_match(tiny_unet, space, macs, tiny_inputs):
    gates = UNetGates(tiny_unet, space)
    vectors = random_vectors(space)
    assert len(vectors) >= 20
    try:
        for i, v in enumerate(vectors):
            with torch.no_grad(), gates.apply(v):
                masked = tiny_unet(*tiny_inputs).sample
            sliced, plan = slice_unet(tiny_unet, space, v)
            with torch.no_grad():
                out = sliced(*tiny_inputs).sample
            assert_close(out, masked, atol=1e-5, rtol=1e-5, msg=lambda m: f"vector {i}: {m}")
            analytic = float(macs(v)[0])
            counted = count_macs(sliced, LATENT, text_len=7)
            assert abs(analytic - counted) <= 0.005 * counted, (i, analytic, counted)
    finally:
        gates.remove()


def test_extreme_vectors_use_replacement_modules(tiny_unet, space):
    sliced, _ = slice_unet(tiny_unet, space, torch.zeros(space.size))
    assert isinstance(sliced.down_blocks[0].resnets[1], SkippedResnet)
    assert isinstance(sliced.down_blocks[0].attentions[1], SkippedTransformer)
    assert isinstance(sliced.down_blocks[0].resnets[0], ZeroWidthResnet)
    assert isinstance(sliced.mid_block.attentions[0].transformer_blocks[0].attn1, ConstantOutput)


def test_keep_all_slice_equals_original(tiny_unet, space, tiny_inputs):
    sliced, plan = slice_unet(tiny_unet, space, torch.ones(space.size))
    assert plan.ops == []
    with torch.no_grad():
        assert torch.equal(sliced(*tiny_inputs).sample, tiny_unet(*tiny_inputs).sample)


def test_sliced_weights_are_the_teachers_kept_rows(tiny_unet, space):
    v = random_vectors(space, n=2, seed=7)[1].clone()
    v[space.depth_mask()] = 1  # keep every block so every width slice is present
    sliced, plan = slice_unet(tiny_unet, space, v)
    ops = {op["module"]: op for op in plan.ops}
    checked = set()
    for path, op in ops.items():
        keep, w = op["keep"], op["unit_width"]
        if not keep:
            continue
        ch = torch.tensor([u * w + c for u in keep for c in range(w)])
        t, s = tiny_unet.get_submodule(path), sliced.get_submodule(path)
        if op["op"] == "resnet_channels":
            assert torch.equal(s.conv1.weight, t.conv1.weight[ch])
            assert torch.equal(s.conv1.bias, t.conv1.bias[ch])
            assert torch.equal(s.time_emb_proj.weight, t.time_emb_proj.weight[ch])
            assert torch.equal(s.norm2.weight, t.norm2.weight[ch]) and s.norm2.num_groups == len(keep)
            assert torch.equal(s.conv2.weight, t.conv2.weight[:, ch])
            assert torch.equal(s.conv2.bias, t.conv2.bias)
        elif op["op"] == "heads":
            for name in ("to_q", "to_k", "to_v"):
                assert torch.equal(getattr(s, name).weight, getattr(t, name).weight[ch])
            assert torch.equal(s.to_out[0].weight, t.to_out[0].weight[:, ch])
            assert s.heads == len(keep) and s.inner_dim == len(ch) and s.to_q.out_features == len(ch)
        else:
            inner = t.net[2].in_features
            assert torch.equal(s.net[0].proj.weight, t.net[0].proj.weight[torch.cat([ch, ch + inner])])
            assert torch.equal(s.net[2].weight, t.net[2].weight[:, ch])
        checked.add(op["op"])
    assert checked == {"resnet_channels", "heads", "ffn_channels"}


def test_per_sample_gates_and_cfg_batches(tiny_unet, space, tiny_inputs):
    """Each sample is gated by its own vector; a doubled (CFG) batch repeats the gates."""
    x, t, c = tiny_inputs
    vs = torch.stack(random_vectors(space, n=3, seed=3)[:3])
    gates = UNetGates(tiny_unet, space)
    try:
        with torch.no_grad():
            with gates.apply(vs):
                batched = tiny_unet(x, t, c).sample
                doubled = tiny_unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c])).sample
            for i in range(3):
                with gates.apply(vs[i]):
                    alone = tiny_unet(x[i : i + 1], t[i : i + 1], c[i : i + 1]).sample
                assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        assert_close(doubled[:3], batched, atol=1e-5, rtol=1e-5)
        assert_close(doubled[3:], batched, atol=1e-5, rtol=1e-5)
    finally:
        gates.remove()


def test_soft_macs_are_differentiable(tiny_unet, space, macs):
    v = torch.full((2, space.size), 0.7, requires_grad=True)
    total = macs(v).sum()
    total.backward()
    assert v.grad is not None and (v.grad[:, ~space.depth_mask()] > 0).any()
    # outside depth blocks the gradient of a width unit is exactly its MACs
    free = (macs.depth_of < 0) & ~space.depth_mask()
    assert_close(v.grad[0, free].double(), macs.unit_macs[free])
    assert abs(float(macs.ratio(torch.ones(space.size))[0]) - 1.0) < 1e-9


def test_full_macs_match_counter(tiny_unet, space, macs):
    assert abs(macs.full - count_macs(tiny_unet, LATENT, text_len=7)) < 1e-3


def test_save_load_identity(tiny_unet, space, tiny_inputs, tmp_path):
    v = random_vectors(space, n=3, seed=11)[1]
    sliced, plan = slice_unet(tiny_unet, space, v)
    path = save_expert(sliced, plan, tmp_path / "expert-0")
    assert {p.name for p in path.iterdir()} == {"plan.json", "config.json", "model.safetensors"}
    loaded = load_expert(path)
    a, b = loaded.state_dict(), sliced.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same weights, bit for bit
    with torch.no_grad():  # outputs to float32 rounding: MKL may round differently at other addresses
        assert_close(loaded(*tiny_inputs).sample, sliced(*tiny_inputs).sample, atol=1e-5, rtol=1e-5)
    assert read_plan(path).ops == plan.ops
    with pytest.raises(FileExistsError):
        save_expert(sliced, plan, path)
    # a second, different model overwrites only when asked, atomically
    other = make_tiny_unet(seed=5)
    o_sliced, o_plan = slice_unet(other, space, v)
    save_expert(o_sliced, o_plan, path, overwrite=True)
    back = load_expert(path)
    assert all(torch.equal(t, o_sliced.state_dict()[k]) for k, t in back.state_dict().items())
    with torch.no_grad():
        assert_close(back(*tiny_inputs).sample, o_sliced(*tiny_inputs).sample, atol=1e-5, rtol=1e-5)


def test_vector_of_wrong_length_is_rejected(tiny_unet, space):
    with pytest.raises(ValueError, match=f"expected \\({space.size},\\)"):
        slice_unet(tiny_unet, space, torch.ones(space.size + 1))


def test_sd21_space_params_and_macs_on_meta():
    from aptp.models.registry import build_unet, resolve_model

    unet = build_unet(resolve_model("sd2.1"))
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    space = build_space(unet)
    assert space.size == 1620
    assert space.by_kind() == {"resnet_channels": 704, "self_attn_heads": 195, "cross_attn_heads": 195,
                               "ffn_channels": 512, "depth": 14}
    for latent, expected in ((64, 402.1e9), (96, 1074.6e9)):
        m = build_macs_model(unet, space, latent)
        assert abs(m.full - expected) / expected < 0.005
        assert abs(count_macs(unet, latent) - expected) / expected < 0.005


def test_sd21_analytic_equals_counted_for_random_vectors():
    from aptp.models.registry import build_unet, resolve_model

    unet = build_unet(resolve_model("sd2.1"))
    space = build_space(unet)
    m = build_macs_model(unet, space, 96)
    for v in random_vectors(space, n=4, seed=2)[:4]:
        sliced, _ = slice_unet(unet, space, v)  # on meta: no weights copied
        counted = count_macs(sliced, 96)
        assert abs(float(m(v)[0]) - counted) <= 0.005 * counted


def test_block_removal_vector_removes_pairs_in_order_then_widths(tiny_unet, space, macs):
    """BK-SDM-style: the pairs go in the given order while the budget allows (one that would
    overshoot is passed over), the removed blocks stay removed, widths meet the budget."""
    from aptp.engine.baselines import block_removal_vector, unit_l1_norms
    from aptp.train.bk_sdm import block_pairs

    names, groups = block_pairs(space)
    assert names == [n for n in dict.fromkeys(s.block for s in space.segments if s.kind == "depth")]
    assert all(n.startswith(("down_blocks", "up_blocks")) for n in names)  # the mid block is no unit
    assert sorted(i for g in groups for i in g) == space.depth_mask().nonzero().flatten().tolist()
    norms = unit_l1_norms(tiny_unet, space)
    # every pair together costs more than a budget of 0.9 allows: only a prefix can go
    all_off = torch.ones(space.size)
    all_off[space.depth_mask()] = 0
    assert float(macs.ratio(all_off)[0]) < 0.9
    v, removed = block_removal_vector(space, macs, norms, groups, 0.9)
    ratio = float(macs.ratio(v)[0])
    assert 0.85 <= ratio <= 0.9 and removed, (ratio, removed)
    for k, g in enumerate(groups):
        assert v[g].eq(0).all() if k in removed else v[g].eq(1).all()
    # the first pair that was passed over would have overshot on its own
    skipped = next((k for k in range(len(groups)) if k not in removed and k < max(removed)), None)
    if skipped is not None:
        trial = torch.ones(space.size)
        for k in removed:
            if k < skipped:
                trial[groups[k]] = 0
        trial[groups[skipped]] = 0
        assert float(macs.ratio(trial)[0]) < 0.9
    # a budget of 1 removes nothing and keeps everything
    v1, removed1 = block_removal_vector(space, macs, norms, groups, 1.0)
    assert removed1 == [] and v1.eq(1).all()
    with pytest.raises(ValueError):
        block_removal_vector(space, macs, norms, [[0]], 0.8)  # index 0 is a width unit


def test_weight_norm_baseline_meets_budget_and_keeps_strong_units(tiny_unet, space, macs):
    from aptp.engine.baselines import unit_l1_norms, weight_norm_vector

    unet = make_tiny_unet(seed=3)
    seg = next(s for s in space.segments if s.kind == "resnet_channels" and s.module == "down_blocks.1.resnets.0")
    with torch.no_grad():  # make group 2 of this layer by far the strongest
        unet.get_submodule(seg.module).conv1.weight[2 * seg.unit_width : 3 * seg.unit_width] *= 50
    norms = unit_l1_norms(unet, space)
    assert norms[seg.offset + 2] == norms[seg.offset : seg.stop].max()
    for budget in (0.5, 0.78):
        v = weight_norm_vector(unet, space, macs, budget)
        ratio = float(macs.ratio(v)[0])
        assert budget - 0.05 <= ratio <= budget
        assert v[space.depth_mask()].eq(1).all()  # width-only
        assert v[seg.offset + 2] == 1
        for s in space.segments:  # every layer keeps at least one unit
            assert s.kind == "depth" or v[s.offset : s.stop].sum() >= 1
