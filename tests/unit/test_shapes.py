"""Tests for the shapes world: determinism, caption/attribute consistency, tier mix, pixels."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from aptp.data.shapes import (
    COLOURS,
    NEUTRAL_RGB,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SPLIT_SIZES,
    TIER_BLOCK_SIZE,
    TIER_COUNTS,
    TIER_MIX,
    TIERS,
    WORDS,
    caption_from_attributes,
    render,
    sample_attributes,
)
from aptp.data.shapes_world import ShapesDataset, ShapesWorld, export_image_folder


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=0)


@pytest.fixture(scope="module")
def by_tier(world: ShapesWorld) -> dict[str, list[int]]:
    """Train indices of the first 1,600 samples, grouped by tier (at least 320 per tier)."""
    groups: dict[str, list[int]] = {t: [] for t in TIERS}
    for index in range(1600):
        groups[world.tier("train", index)].append(index)
    return groups


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32)  # (H, W, 3)


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: float = 40.0) -> np.ndarray:
    """Boolean mask (H, W) of pixels within ``tolerance`` (RGB distance) of ``rgb``."""
    return np.linalg.norm(pixels - np.asarray(rgb, np.float32), axis=-1) < tolerance


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    assert len(xs) > 0, "colour not found in image"
    return float(xs.mean()), float(ys.mean())


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_png_bytes() -> None:
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for index in range(0, 40, 3):  # spans every tier
        # Fresh world objects and a reversed access order: nothing may depend on history.
        assert a.sample("train", index).png_bytes() == b.sample("train", index).png_bytes()
    for index in reversed(range(0, 40, 3)):
        assert a.sample("train", index).png_bytes() == b.sample("train", index).png_bytes()


def test_different_seed_gives_different_samples() -> None:
    a, b = ShapesWorld(seed=0), ShapesWorld(seed=1)
    for index in range(12):
        assert a.sample("train", index).png_bytes() != b.sample("train", index).png_bytes()


def test_train_and_validation_differ(world: ShapesWorld) -> None:
    for index in range(12):
        assert (world.sample("train", index).png_bytes()
                != world.sample("validation", index).png_bytes())
    assert world.captions("train", 200) != world.captions("validation", 200)


def test_split_sizes_and_bounds(world: ShapesWorld) -> None:
    assert world.split_size("train") == SPLIT_SIZES["train"] == 20_000
    assert world.split_size("validation") == SPLIT_SIZES["validation"] == 2_000
    world.sample("validation", 1999)
    with pytest.raises(IndexError, match="2000"):
        world.sample("validation", 2000)
    with pytest.raises(ValueError, match="'test'"):
        world.sample("test", 0)
    with pytest.raises(ValueError, match="-1"):
        ShapesWorld(seed=-1)
    with pytest.raises(ValueError, match="'expert'"):
        sample_attributes(np.random.default_rng(0), "expert")


# ----------------------------------------------------------------------------- captions

# An independent parser of the grammar: reading the attributes back out of the caption tests
# that the caption says what the scene contains, not merely that one function agrees with itself.
_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_SINGLE = rf"(?P<art{{g}}>a|an) (?P<colour{{g}}>{_COLOUR}) (?P<shape{{g}}>{_SHAPE})"
_PLURAL = rf"two (?P<pcolour{{g}}>{_COLOUR}) (?P<pshape{{g}}>{_SHAPE})s"
_PHRASE = "(?:" + _SINGLE + "|" + _PLURAL + ")"
_PATTERNS = {
    "easy": re.compile(rf"^{_SINGLE.format(g=0)}$"),
    "medium": re.compile(
        rf"^(?P<art>a) (?P<size>small|large) (?P<colour>{_COLOUR}) (?P<shape>{_SHAPE}) "
        rf"in the (?P<position>{'|'.join(POSITIONS)}) on (?P<bgart>a|an) (?P<bg>{_COLOUR})"
        r"(?: (?P<kind>striped|dotted|checkered))? background$"),
    "hard": re.compile(rf"^{_PHRASE.format(g=0)} (?P<rel>{'|'.join(RELATIONS)}) {_PHRASE.format(g=1)}$"),
    "hardest": re.compile(
        rf"^the word (?P<word>[A-Z]{{3,4}}) in (?P<colour>{_COLOUR}) letters "
        rf"on (?P<bgart>a|an) (?P<bg>{_COLOUR}) background$"),
}


def _article_ok(article: str, word: str) -> bool:
    return article == ("an" if word[0] in "aeiou" else "a")


def _check_parse(caption: str, attributes: dict) -> None:
    tier = attributes["tier"]
    m = _PATTERNS[tier].match(caption)
    assert m, f"{tier} caption does not fit the grammar: {caption!r}"
    g = m.groupdict()
    objects = attributes["objects"]
    if tier == "easy":
        assert (g["colour0"], g["shape0"]) == (objects[0]["colour"], objects[0]["shape"])
        assert _article_ok(g["art0"], g["colour0"])
    elif tier == "medium":
        obj, bg = objects[0], attributes["background"]
        assert (g["size"], g["colour"], g["shape"], g["position"]) == (
            obj["size"], obj["colour"], obj["shape"], obj["position"])
        assert (g["bg"], g["kind"] or "plain") == (bg["colour"], bg["kind"])
        assert _article_ok(g["bgart"], g["bg"])
    elif tier == "hard":
        assert g["rel"] == attributes["relation"]
        for i, obj in enumerate(objects):
            if obj["count"] == 1:
                assert (g[f"colour{i}"], g[f"shape{i}"]) == (obj["colour"], obj["shape"])
                assert _article_ok(g[f"art{i}"], g[f"colour{i}"])
            else:
                assert (g[f"pcolour{i}"], g[f"pshape{i}"]) == (obj["colour"], obj["shape"])
            assert len(obj["centers"]) == obj["count"]
        assert 2 <= sum(o["count"] for o in objects) <= 3
    else:
        text, bg = attributes["text"], attributes["background"]
        assert (g["word"], g["colour"], g["bg"]) == (text["word"], text["colour"], bg["colour"])
        assert _article_ok(g["bgart"], g["bg"])


def test_caption_matches_attributes_for_every_tier(world: ShapesWorld, by_tier) -> None:
    for tier, indices in by_tier.items():
        assert len(indices) >= 300, (tier, len(indices))
        for index in indices[:300]:
            attributes = world.attributes("train", index)
            caption = caption_from_attributes(attributes)
            assert attributes["tier"] == tier
            _check_parse(caption, attributes)
            # Attributes are JSON data: a round trip changes nothing, not even the render.
            assert json.loads(json.dumps(attributes)) == attributes
    for index in range(0, 1600, 97):
        sample = world.sample("train", index)
        assert sample.caption == caption_from_attributes(sample.attributes)
        assert sample.tier == sample.attributes["tier"]
        restored = json.loads(json.dumps(sample.attributes))
        assert np.array_equal(_pixels(render(restored)), _pixels(sample.image))


def test_shapes_never_take_the_background_colour(world: ShapesWorld, by_tier) -> None:
    for tier in ("medium", "hardest"):
        for index in by_tier[tier][:300]:
            a = world.attributes("train", index)
            foreground = a["objects"][0]["colour"] if tier == "medium" else a["text"]["colour"]
            assert foreground != a["background"]["colour"]
    for index in by_tier["hard"][:300]:
        a = world.attributes("train", index)
        assert a["objects"][0]["colour"] != a["objects"][1]["colour"]


def test_vocabulary_covers_captions(world: ShapesWorld) -> None:
    vocab = world.vocabulary()
    assert vocab == sorted(set(vocab))
    for caption in world.captions("train", 500):
        missing = set(caption.split()) - set(vocab)
        assert not missing, (caption, missing)
    # And nothing in it is dead: 5,000 captions use every word.
    used = {word for caption in world.captions("train", 5000) for word in caption.split()}
    assert used == set(vocab)
    # A lowercasing tokenizer must not merge a rendered word with a grammar word.
    assert len({w.lower() for w in vocab}) == len(vocab)
    assert 40 <= len(WORDS) <= 60 and all(w.isupper() and 3 <= len(w) <= 4 for w in WORDS)


# ----------------------------------------------------------------------------- tier mix


def test_tier_mix(world: ShapesWorld) -> None:
    assert sum(TIER_COUNTS.values()) == TIER_BLOCK_SIZE
    assert abs(sum(TIER_MIX.values()) - 1.0) < 1e-9
    for split in ("train", "validation"):
        tiers = [world.tier(split, i) for i in range(2000)]
        for tier in TIERS:
            assert abs(tiers.count(tier) / 2000 - TIER_MIX[tier]) <= 0.03, (split, tier)
        # Stratified: every aligned block holds the exact counts.
        block = tiers[:TIER_BLOCK_SIZE]
        assert {t: block.count(t) for t in TIERS} == TIER_COUNTS
    assert [world.tier("train", i) for i in range(40)] == [
        world.attributes("train", i)["tier"] for i in range(40)]


# ----------------------------------------------------------------------------- pixels


def _first(world: ShapesWorld, tier: str, n: int, accept=lambda a: True, limit: int = 4000) -> list:
    found = []
    for index in range(limit):
        if world.tier("train", index) == tier and accept(world.attributes("train", index)):
            found.append(world.sample("train", index))
            if len(found) == n:
                break
    assert len(found) == n, f"only {len(found)} {tier} samples matched"
    return found


def test_easy_dominant_colour_is_the_named_colour(world: ShapesWorld) -> None:
    for sample in _first(world, "easy", 40):
        pixels = _pixels(sample.image).reshape(-1, 3)
        foreground = pixels[np.linalg.norm(pixels - np.asarray(NEUTRAL_RGB), axis=1) > 30]
        assert len(foreground) > 0.1 * len(pixels)  # one large shape (a star covers ~15%)
        dominant = np.median(foreground, axis=0)
        named = sample.attributes["objects"][0]["colour"]
        nearest = min(PALETTE, key=lambda c: np.linalg.norm(dominant - np.asarray(PALETTE[c])))
        assert nearest == named, (sample.caption, dominant)
        assert np.linalg.norm(dominant - np.asarray(PALETTE[named])) < 25, (sample.caption, dominant)


_QUADRANT = {  # position -> (x test, y test) on the colour centroid
    "top left": (lambda x: x < 32, lambda y: y < 32),
    "top right": (lambda x: x > 32, lambda y: y < 32),
    "bottom left": (lambda x: x < 32, lambda y: y > 32),
    "bottom right": (lambda x: x > 32, lambda y: y > 32),
    "center": (lambda x: 24 < x < 40, lambda y: 24 < y < 40),
}


def test_medium_shape_lies_in_its_named_position(world: ShapesWorld) -> None:
    top_left = _first(world, "medium", 10, lambda a: a["objects"][0]["position"] == "top left")
    for sample in top_left + _first(world, "medium", 40):
        obj = sample.attributes["objects"][0]
        x, y = _centroid(_near(_pixels(sample.image), PALETTE[obj["colour"]]))
        x_ok, y_ok = _QUADRANT[obj["position"]]
        assert x_ok(x) and y_ok(y), (sample.caption, x, y)


def test_medium_small_is_smaller_than_large(world: ShapesWorld) -> None:
    area = {"small": [], "large": []}
    for sample in _first(world, "medium", 40):
        obj = sample.attributes["objects"][0]
        area[obj["size"]].append(_near(_pixels(sample.image), PALETTE[obj["colour"]]).sum())
    assert max(area["small"]) < min(area["large"]), area


def test_hardest_shows_text_and_background_colours(world: ShapesWorld) -> None:
    for sample in _first(world, "hardest", 30):
        pixels = _pixels(sample.image)
        text_px = _near(pixels, PALETTE[sample.attributes["text"]["colour"]], 30).sum()
        bg_px = _near(pixels, PALETTE[sample.attributes["background"]["colour"]], 30).sum()
        assert text_px >= 60, (sample.caption, text_px)  # letters, not a few stray pixels
        assert bg_px >= 0.5 * 64 * 64, (sample.caption, bg_px)
        # The word spans most of the width, so it is large enough to read.
        columns = np.nonzero(_near(pixels, PALETTE[sample.attributes["text"]["colour"]], 60).any(0))[0]
        assert columns.max() - columns.min() >= 40, (sample.caption, columns.min(), columns.max())


def test_hard_relation_holds_in_pixels(world: ShapesWorld) -> None:
    left_of = _first(world, "hard", 10, lambda a: a["relation"] == "left of")
    for sample in left_of:
        first, second = sample.attributes["objects"]
        x1, _ = _centroid(_near(_pixels(sample.image), PALETTE[first["colour"]]))
        x2, _ = _centroid(_near(_pixels(sample.image), PALETTE[second["colour"]]))
        assert x1 < x2, (sample.caption, x1, x2)
    for sample in _first(world, "hard", 40):
        first, second = sample.attributes["objects"]
        p1 = _centroid(_near(_pixels(sample.image), PALETTE[first["colour"]]))
        p2 = _centroid(_near(_pixels(sample.image), PALETTE[second["colour"]]))
        relation = sample.attributes["relation"]
        ok = {"left of": p1[0] < p2[0] - 15, "right of": p1[0] > p2[0] + 15,
              "above": p1[1] < p2[1] - 15, "below": p1[1] > p2[1] + 15}[relation]
        assert ok, (sample.caption, p1, p2)


def test_pixel_checks_can_fail() -> None:
    # Swapping the two groups of a "left of" scene must flip the measured order.
    rng = np.random.default_rng(0)
    attributes = sample_attributes(rng, "hard")
    while attributes["relation"] != "left of":
        attributes = sample_attributes(rng, "hard")
    first, second = attributes["objects"]
    swapped = dict(attributes, objects=[dict(first, colour=second["colour"]),
                                        dict(second, colour=first["colour"])])
    pixels = _pixels(render(swapped))
    x1, _ = _centroid(_near(pixels, PALETTE[first["colour"]]))
    x2, _ = _centroid(_near(pixels, PALETTE[second["colour"]]))
    assert x1 > x2


# ----------------------------------------------------------------------------- torch / export


def test_dataset_items() -> None:
    dataset = ShapesDataset("validation", size=8, seed=0)
    assert len(dataset) == 8
    item = dataset[5]
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["pixel_values"].dtype == torch.float32
    assert -1.0 <= item["pixel_values"].min() < -0.3 and 0.3 < item["pixel_values"].max() <= 1.0
    assert item["index"] == 5 and item["tier"] in TIERS
    assert caption_from_attributes(json.loads(item["attributes"])) == item["caption"]
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and len(batch["caption"]) == 4
    with pytest.raises(IndexError):
        dataset[8]


def test_dataset_resolution_and_world() -> None:
    world = ShapesWorld(seed=2)
    small = ShapesDataset("train", size=4, resolution=32, world=world)
    item = small[1]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert float(item["pixel_values"].abs().max()) <= 1.0
    assert item["caption"] == world.sample("train", 1).caption
    with pytest.raises(ValueError, match="seed=5"):
        ShapesDataset("train", seed=5, world=world)
    with pytest.raises(ValueError, match="size=2001"):
        ShapesDataset("validation", size=2001)


def test_export_image_folder(tmp_path) -> None:
    out = export_image_folder(tmp_path / "ref", "validation", 5, seed=0)
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in lines] == [f"{i:06d}.png" for i in range(5)]
    world = ShapesWorld(0)
    for i, record in enumerate(lines):
        sample = world.sample("validation", i)
        assert (record["text"], record["tier"], record["attributes"]) == (
            sample.caption, sample.tier, sample.attributes)
        assert (out / record["file_name"]).read_bytes() == sample.png_bytes()
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(5)] + ["metadata.jsonl"]


def test_export_image_folder_of_one_tier(tmp_path) -> None:
    """tiers=[...]: the split's first n samples of those tiers only, each with its split index."""
    world = ShapesWorld(0)
    out = export_image_folder(tmp_path / "medium", "train", 40, tiers=["medium"])
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    want = [i for i in range(40) if world.tier("train", i) == "medium"]
    assert 0 < len(want) < 40 and [r["index"] for r in lines] == want
    assert all(r["tier"] == "medium" and r["text"] == world.sample("train", r["index"]).caption for r in lines)
    assert len(list(out.glob("*.png"))) == len(want)
    with pytest.raises(ValueError, match="unknown tiers"):
        export_image_folder(tmp_path / "x", "train", 4, tiers=["impossible"])
