"""Word tables, tier mixes, block-level MACs and plots of `aptp inspect-experts` (aptp.analysis)."""

from __future__ import annotations

import csv
import io

import pandas as pd
import pytest
import torch
from PIL import Image

from aptp.analysis.blocks import OTHER, BlockMacs, block_names, counted_block_macs, ratio_matrix
from aptp.analysis.report import ExpertReport, to_csv, to_markdown, to_records
from aptp.analysis.words import STOP_WORDS, content_words, tier_mix, tokenize, word_table
from aptp.engine.slicing import slice_unet
from aptp.engine.space import build_space
from tests.conftest import make_tiny_unet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- words
def test_tokenize_lowercases_strips_punctuation_and_possessives():
    assert tokenize("A dog's ball, on the GRASS!  (x-ray) 3 cats") == \
        ["a", "dog", "ball", "on", "the", "grass", "x", "ray", "3", "cats"]
    assert tokenize("don't") == ["don't"]
    # stop words, single letters and bare numbers never reach the table
    assert content_words("a photo of the 2 dogs in x") == ["photo", "dogs"]
    assert {"the", "a", "of", "in", "and"} <= STOP_WORDS


def test_word_table_counts_once_per_prompt_and_orders_ties_alphabetically():
    prompts = ["a red circle and a red square", "a blue circle", "the blue square", "a green star"]
    experts = [0, 0, 0, 1]
    t = word_table(prompts, experts, top_k=3)
    assert list(t.index) == [0, 1]
    assert t.loc[0, "prompts"] == 3 and t.loc[0, "share"] == pytest.approx(0.75)
    # circle 2, square 2, blue 2, red 1 (once per prompt despite two occurrences): ties by word
    assert t.loc[0, "words"] == ["blue", "circle", "square"]
    assert t.loc[0, "counts"] == [2, 2, 2]
    assert t.loc[1, "words"] == ["green", "star"] and t.loc[1, "counts"] == [1, 1]
    occ = word_table(prompts, experts, top_k=1, count="occurrence")
    assert occ.loc[0, "words"] == ["blue"] and occ.loc[0, "counts"] == [2]
    occ4 = word_table(prompts, experts, top_k=4, count="occurrence")
    assert dict(zip(occ4.loc[0, "words"], occ4.loc[0, "counts"]))["red"] == 2


def test_word_table_stop_words_extend_and_replace():
    prompts = ["a cat on the background", "a cat near a background tree"]
    t = word_table(prompts, [0, 0], top_k=5)
    assert t.loc[0, "words"] == ["background", "cat", "tree"]
    assert all(w not in STOP_WORDS for w in t.loc[0, "words"])
    assert word_table(prompts, [0, 0], extra_stop_words=["Background"]).loc[0, "words"] == ["cat", "tree"]
    own = word_table(prompts, [0, 0], top_k=2, stop_words={"cat", "background"})
    # a list of one's own replaces the default: 'the' counts now; one-letter 'a' never does
    assert own.loc[0, "words"] == ["near", "on"]
    assert word_table(prompts, [0, 0], top_k=5, stop_words={"cat"}).loc[0, "words"] == \
        ["background", "near", "on", "the", "tree"]


def test_word_table_lists_experts_without_prompts_and_checks_input():
    t = word_table(["a red circle"], [2], num_experts=4)
    assert list(t.index) == [0, 1, 2, 3]
    assert t.loc[0, "prompts"] == 0 and t.loc[0, "words"] == [] and t.loc[0, "share"] == 0.0
    assert t["share"].sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 prompts but 1"):
        word_table(["a", "b"], [0])
    with pytest.raises(ValueError, match="top_k"):
        word_table(["a"], [0], top_k=0)
    with pytest.raises(ValueError, match=r"\[5\] outside 0..3"):
        word_table(["a"], [5], num_experts=4)
    with pytest.raises(ValueError, match="count"):
        word_table(["a"], [0], count="words")


def test_word_table_is_a_pure_function_of_its_input():
    g = torch.Generator("cpu").manual_seed(0)
    vocab = ["red", "blue", "circle", "square", "star", "left", "right"]
    prompts = [" ".join(vocab[i] for i in torch.randint(0, len(vocab), (4,), generator=g).tolist()) for _ in range(50)]
    experts = torch.randint(0, 3, (50,), generator=g).tolist()
    a = word_table(prompts, experts)
    perm = torch.randperm(50, generator=g).tolist()
    b = word_table([prompts[i] for i in perm], [experts[i] for i in perm])
    pd.testing.assert_frame_equal(a, b)


def test_tier_mix_fractions_per_expert():
    tiers = ["easy", "hard", "hard", "hardest", "medium", "odd"]
    experts = [0, 0, 0, 1, 1, 1]
    m = tier_mix(tiers, experts, num_experts=3)
    assert list(m.columns) == ["easy", "medium", "hard", "hardest", "odd"]
    assert m.loc[0, "hard"] == pytest.approx(2 / 3) and m.loc[0, "easy"] == pytest.approx(1 / 3)
    assert m.loc[1, ["medium", "hardest", "odd"]].tolist() == pytest.approx([1 / 3] * 3)
    assert m.loc[[0, 1]].sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    assert m.loc[2].sum() == 0.0  # no prompts: zeros, not NaN
    with pytest.raises(ValueError):
        tier_mix(["easy"], [0, 1])


# ---------------------------------------------------------------------------- blocks
@pytest.fixture(scope="module")
def tiny_blocks():
    unet = make_tiny_unet()
    space = build_space(unet)
    return unet, space, BlockMacs(unet, space, 8, 7)


def _random_hard_vector(space, seed: int, keep: float = 0.6) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(seed)
    v = (torch.rand(space.size, generator=g) < keep).float()
    depth = space.depth_mask()
    v[depth] = (torch.arange(int(depth.sum())) % 2).float()  # every other depth block skipped
    return v


def test_full_model_keeps_every_block(tiny_blocks):
    unet, space, bm = tiny_blocks
    full = bm(space.full_vector())
    assert list(full) == block_names(unet) + [OTHER]
    assert full == pytest.approx(bm.full)
    assert sum(full.values()) == pytest.approx(bm.macs.full)


@pytest.mark.parametrize("seed", [0, 1])
def test_expert_blocks_sum_to_its_macs_and_match_counted(tiny_blocks, seed):
    unet, space, bm = tiny_blocks
    v = _random_hard_vector(space, seed)
    analytic = bm(v)
    assert sum(analytic.values()) == pytest.approx(float(bm.macs(v.double())[0]), rel=1e-12)
    sliced, _ = slice_unet(unet, space, v)
    counted = counted_block_macs(sliced, 8, 7)
    assert counted == pytest.approx(analytic, rel=1e-9)
    assert analytic[OTHER] == pytest.approx(bm.full[OTHER])  # conv_in, time embedding, conv_out: never pruned
    table = bm.table({3: v})
    assert list(table.columns) == ["expert", "block", "macs", "full_macs", "ratio"]
    assert ((table.ratio > 0) & (table.ratio <= 1)).all()
    assert table.macs.sum() == pytest.approx(sum(analytic.values()))
    mat = ratio_matrix(table)
    assert list(mat.index) == [3] and list(mat.columns) == block_names(unet)


# ---------------------------------------------------------------------------- renderers
def _report() -> ExpertReport:
    summary = pd.DataFrame({"macs_ratio": [0.5, 0.75], "params": [1000, 2500], "prompts": [3, 1],
                            "share": [0.75, 0.25], "words": [["red", "a|b"], []], "counts": [[3, 1], []]},
                           index=pd.Index([1, 0], name="expert"))
    tiers = pd.DataFrame({"easy": [1.0, 0.0], "hard": [0.0, 1.0]}, index=pd.Index([1, 0], name="expert"))
    return ExpertReport(summary=summary, tiers=tiers, prompts=["p"] * 4, experts=[1, 1, 1, 0], split="validation",
                        count="prompt")


def test_markdown_table_escapes_and_keeps_row_order():
    md = to_markdown(_report()).splitlines()
    assert md[0] == "| expert | MACs ratio | params | prompts | share | most frequent words | tiers |"
    assert md[1].startswith("| ---: |")
    assert md[2] == "| 1 | 0.500 | 1,000 | 3 | 75.0% | red (3) - a\\|b (1) | easy 100% hard 0% |"
    assert md[3].startswith("| 0 | 0.750 |") and len(md) == 4


def test_csv_and_records_round_trip():
    rows = list(csv.DictReader(io.StringIO(to_csv(_report(), top_k=3))))
    assert [r["expert"] for r in rows] == ["1", "0"]
    assert rows[0]["word_1"] == "red" and rows[0]["count_2"] == "1" and rows[0]["word_3"] == ""
    assert float(rows[0]["tier_easy"]) == 1.0 and float(rows[1]["macs_ratio"]) == 0.75
    blocks = pd.DataFrame({"expert": [1, 0], "block": ["mid_block", "mid_block"], "ratio": [0.4, 0.9]})
    rec = to_records(_report(), blocks)
    assert rec["prompts"] == 4 and rec["experts"][0]["words"] == [{"word": "red", "count": 3}, {"word": "a|b", "count": 1}]
    assert rec["experts"][1]["block_macs_ratio"] == {"mid_block": 0.9} and rec["experts"][1]["tiers"]["hard"] == 1.0


# ---------------------------------------------------------------------------- plots
def _is_png(path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        return im.size


def test_plots_write_pngs(tmp_path, tiny_blocks):
    from aptp.analysis import plots

    unet, space, bm = tiny_blocks
    blocks = bm.table({k: _random_hard_vector(space, k) for k in range(3)})
    labels = {0: "expert 0 (0.40)"}
    w, h = _is_png(plots.plot_block_ratios(blocks, tmp_path / "b.png", labels=labels))
    assert w > 400 and h > 300
    summary = pd.DataFrame({"share": [0.5, 0.3, 0.2], "macs_ratio": [0.4, 0.6, 0.9], "prompts": [5, 3, 2]},
                           index=pd.Index([0, 1, 2], name="expert"))
    _is_png(plots.plot_shares(summary, tmp_path / "s.png"))
    mix = tier_mix(["easy", "hard", "hardest"], [0, 1, 1], num_experts=3)
    _is_png(plots.plot_tier_mix(mix, tmp_path / "t.png"))
    img = Image.new("RGB", (16, 16), (200, 30, 30))
    _is_png(plots.sample_grid({0: [img, img], 1: [img], 2: []}, tmp_path / "g.png",
                              captions={0: ["a red square", "a very long caption " * 4], 1: ["x"]}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png", "g.png", "s.png", "t.png"]  # no temp files left
