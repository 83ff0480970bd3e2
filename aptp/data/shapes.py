"""The ``shapes`` world: a deterministic synthetic text-to-image dataset of graded difficulty.

Every sample is a 64x64 RGB image with a caption drawn from a small grammar. The grammar has four
tiers, so that a pruned model can be shown to fail first on the prompts that need more capacity:

- ``easy``: one large centred shape on a neutral grey background ("a red circle").
- ``medium``: one shape with size, position and background ("a small blue square in the top
  left on a red striped background").
- ``hard``: two or three objects with counts and a spatial relation ("two green triangles left
  of a yellow star").
- ``hardest``: a rendered word ("the word SUN in white letters on a black background").

This module defines a scene: the grammar, its captions and the renderer. The seeded splits, the
torch data set and the image-folder export are in :mod:`aptp.data.shapes_world`, where a sample is
a pure function of ``(seed, split, index)``. The caption and the image are both produced from
one structured ``attributes`` dict (JSON-serialisable), which makes caption/image consistency
testable and lets evaluation code ask what a prompt asked for without parsing text.

Geometry in ``attributes`` is stored in "world units" (pixels of the 64x64 image) so that
:func:`render` can draw the same scene at any size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TIERS: tuple[str, ...] = ("easy", "medium", "hard", "hardest")

# The tier mix is exact, not merely expected: indices are grouped into blocks of
# TIER_BLOCK_SIZE and each block holds exactly these counts in a seeded order. Any 20
# consecutive indices starting at a multiple of 20 therefore have the documented mix, and
# small evaluation subsets are not skewed by sampling noise.
TIER_BLOCK_SIZE = 20
TIER_COUNTS: dict[str, int] = {"easy": 5, "medium": 6, "hard": 5, "hardest": 4}
TIER_MIX: dict[str, float] = {t: n / TIER_BLOCK_SIZE for t, n in TIER_COUNTS.items()}  # 25/30/25/20 %

SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1}
SPLIT_SIZES: dict[str, int] = {"train": 20_000, "validation": 2_000}

BASE_RESOLUTION = 64
# Shapes and text are drawn at 4x and box-averaged down: PIL's polygon fill has no
# anti-aliasing, and jagged 64 px edges would waste autoencoder capacity on aliasing. A box
# filter gives each pixel its exact area coverage; LANCZOS was tried and rings (a light halo
# around dark shapes, 2-10 levels of overshoot), which the models would then have to learn.
SUPERSAMPLE = 4

# Eight colours that stay distinguishable after blur and downsampling: the closest pair
# (red/orange, orange/yellow) is still about 95 apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (245, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 125, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Captions of easy and hard prompts name no background, so it must be one fixed colour that
# no shape can take; grey is not in PALETTE, so every palette colour stays visible on it.
NEUTRAL_BACKGROUND = "gray"
NEUTRAL_RGB: tuple[int, int, int] = (128, 128, 128)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "heart")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
# (count of the first group, count of the second): two or three objects in all.
HARD_COUNTS: tuple[tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2))

# Short uppercase words for the hardest tier. None of them, lowercased, is another caption
# word (no colour, shape or position names), so a lowercasing tokenizer stays unambiguous.
WORDS: tuple[str, ...] = (
    "SUN", "CAT", "DOG", "MAP", "BOX", "CUP", "KEY", "HAT", "PEN", "BUS",
    "CAR", "FOX", "OWL", "BEE", "EGG", "ICE", "JAM", "LOG", "NET", "PIG",
    "TOY", "VAN", "WEB", "ZIP", "ART", "AXE", "BAG", "JOY", "SKY", "ZOO",
    "MOON", "FISH", "BIRD", "TREE", "SHIP", "LAMP", "BOOK", "DOOR", "FROG", "KITE",
    "LION", "MILK", "NEST", "RAIN", "ROSE", "SNOW", "WIND", "BELL", "CAKE", "DUCK",
)

# Words the grammar itself contributes, besides the attribute values above.
_GRAMMAR_WORDS: tuple[str, ...] = (
    "a", "an", "the", "two", "in", "on", "of", "background", "word", "letters",
)

_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
_COUNT_WORDS: dict[int, str] = {2: "two"}

# Layout constants, in world units (pixels of the 64x64 image).
_EASY_RADIUS = (19.0, 22.0)
_MEDIUM_RADIUS = {"small": (6.5, 8.0), "large": (11.5, 13.0)}
_MEDIUM_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (17.0, 17.0),
    "top right": (47.0, 17.0),
    "bottom left": (17.0, 47.0),
    "bottom right": (47.0, 47.0),
    "center": (32.0, 32.0),
}
_MEDIUM_JITTER = {"small": 4.0, "large": 2.5}
_HARD_RADIUS = (8.0, 9.5)
_PATTERN_PERIOD = 8.0
_TEXT_WIDTH_FRACTION = 0.82  # the word fills most of the width, so 3-4 letters stay legible
_TEXT_HEIGHT_FRACTION = 0.45


# ----------------------------------------------------------------------------- sampling


def _pick(rng: np.random.Generator, options: tuple[Any, ...]) -> Any:
    # Index into a tuple instead of rng.choice so that values stay plain Python objects
    # (json.dumps rejects numpy scalars).
    return options[int(rng.integers(len(options)))]


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    # Rounded so that the JSON attributes round-trip exactly and stay short.
    return round(float(rng.uniform(low, high)), 2)


def _obj(shape: str, colour: str, count: int, size: str, position: str, radius: float,
         centers: list[list[float]]) -> dict[str, Any]:
    return {"shape": shape, "colour": colour, "count": count, "size": size,
            "position": position, "radius": radius, "centers": centers}


def _scene(tier: str, background: dict[str, str], objects: list[dict[str, Any]],
           relation: str | None = None, text: dict[str, Any] | None = None) -> dict[str, Any]:
    # Every tier has the same top-level keys, so consumers never need tier-specific lookups.
    return {"tier": tier, "background": background, "objects": objects,
            "relation": relation, "text": text}


def _sample_easy(rng: np.random.Generator) -> dict[str, Any]:
    shape, colour = _pick(rng, SHAPES), _pick(rng, COLOURS)
    radius = _uniform(rng, *_EASY_RADIUS)
    center = [32.0 + _uniform(rng, -2.0, 2.0), 32.0 + _uniform(rng, -2.0, 2.0)]
    background = {"kind": "plain", "colour": NEUTRAL_BACKGROUND}
    return _scene("easy", background, [_obj(shape, colour, 1, "large", "center", radius, [center])])


def _sample_medium(rng: np.random.Generator) -> dict[str, Any]:
    shape, size, position = _pick(rng, SHAPES), _pick(rng, SIZES), _pick(rng, POSITIONS)
    kind = _pick(rng, BACKGROUND_KINDS)
    background_colour = _pick(rng, COLOURS)
    # Never draw a shape in the background colour: it would be invisible.
    colour = _pick(rng, tuple(c for c in COLOURS if c != background_colour))
    radius = _uniform(rng, *_MEDIUM_RADIUS[size])
    jitter = _MEDIUM_JITTER[size]
    ax, ay = _MEDIUM_ANCHORS[position]
    center = [round(ax + _uniform(rng, -jitter, jitter), 2), round(ay + _uniform(rng, -jitter, jitter), 2)]
    background = {"kind": kind, "colour": background_colour}
    return _scene("medium", background, [_obj(shape, colour, 1, size, position, radius, [center])])


def _sample_hard(rng: np.random.Generator) -> dict[str, Any]:
    relation = _pick(rng, RELATIONS)
    counts = _pick(rng, HARD_COUNTS)
    colour_a = _pick(rng, COLOURS)
    # Distinct colours keep "which object is where" recoverable from pixels alone.
    colour_b = _pick(rng, tuple(c for c in COLOURS if c != colour_a))
    shapes = (_pick(rng, SHAPES), _pick(rng, SHAPES))
    # The first group sits on the side the relation names, the second on the opposite side.
    horizontal = relation in ("left of", "right of")
    first_low = relation in ("left of", "above")
    sides = ("left", "right") if horizontal else ("top", "bottom")
    # Single objects share one cross-axis line (give or take 4), so that the cross-axis offset
    # between the groups stays far below the along-axis one and "left of" is never also
    # plainly "above".
    shared_cross = _uniform(rng, 22.0, 42.0)
    objects = []
    for group, (count, colour, shape) in enumerate(zip(counts, (colour_a, colour_b), shapes)):
        low = first_low if group == 0 else not first_low
        radius = _uniform(rng, *_HARD_RADIUS)
        along_anchor = 16.0 if low else 48.0
        if count == 1:
            crosses = [shared_cross + _uniform(rng, -4.0, 4.0)]
        else:
            crosses = [18.0 + _uniform(rng, -2.0, 2.0), 46.0 + _uniform(rng, -2.0, 2.0)]
        centers = []
        for cross in crosses:
            along = round(along_anchor + _uniform(rng, -3.0, 3.0), 2)
            cross = round(cross, 2)
            centers.append([along, cross] if horizontal else [cross, along])
        side = sides[0] if low else sides[1]
        objects.append(_obj(shape, colour, count, "small", side, radius, centers))
    return _scene("hard", {"kind": "plain", "colour": NEUTRAL_BACKGROUND}, objects, relation=relation)


def _sample_hardest(rng: np.random.Generator) -> dict[str, Any]:
    word = _pick(rng, WORDS)
    text_colour = _pick(rng, COLOURS)
    background_colour = _pick(rng, tuple(c for c in COLOURS if c != text_colour))
    center = [32.0 + _uniform(rng, -1.5, 1.5), 32.0 + _uniform(rng, -1.5, 1.5)]
    text = {"word": word, "colour": text_colour, "center": center}
    return _scene("hardest", {"kind": "plain", "colour": background_colour}, [], text=text)


_SAMPLERS = {"easy": _sample_easy, "medium": _sample_medium, "hard": _sample_hard,
             "hardest": _sample_hardest}


def sample_attributes(rng: np.random.Generator, tier: str) -> dict[str, Any]:
    """Draws a random scene of one tier.

    Args:
        rng: Source of randomness; the result is a pure function of its state.
        tier: One of :data:`TIERS`.

    Returns:
        A JSON-serialisable dict with keys ``tier``, ``background`` (``kind``, ``colour``),
        ``objects`` (each with ``shape``, ``colour``, ``count``, ``size``, ``position``,
        ``radius`` and one ``centers`` entry per copy, in world units), ``relation`` (hard
        tier, else None) and ``text`` (hardest tier: ``word``, ``colour``, ``center``; else None).

    Raises:
        ValueError: If ``tier`` is unknown.
    """
    if tier not in _SAMPLERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    return _SAMPLERS[tier](rng)


# ----------------------------------------------------------------------------- captions


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(obj: dict[str, Any]) -> str:
    count = obj["count"]
    if count == 1:
        return f"{_article(obj['colour'])} {obj['colour']} {obj['shape']}"
    if count not in _COUNT_WORDS:
        raise ValueError(f"object count {count} has no caption word; supported: 1, {sorted(_COUNT_WORDS)}")
    return f"{_COUNT_WORDS[count]} {obj['colour']} {_PLURALS[obj['shape']]}"


def _background_phrase(background: dict[str, str]) -> str:
    colour, kind = background["colour"], background["kind"]
    if kind == "plain":
        return f"{_article(colour)} {colour} background"
    return f"{_article(colour)} {colour} {kind} background"


def caption_from_attributes(attributes: dict[str, Any]) -> str:
    """Builds the caption that describes a scene.

    Args:
        attributes: A scene as returned by :func:`sample_attributes`.

    Returns:
        The caption, e.g. ``"a small blue square in the top left on a red striped background"``.

    Raises:
        ValueError: If the tier is unknown or the scene does not fit its tier's grammar.
    """
    tier = attributes.get("tier")
    objects = attributes.get("objects", [])
    if tier == "easy":
        return _noun_phrase(objects[0])
    if tier == "medium":
        obj = objects[0]
        return (f"{_article(obj['size'])} {obj['size']} {obj['colour']} {obj['shape']} "
                f"in the {obj['position']} on {_background_phrase(attributes['background'])}")
    if tier == "hard":
        if len(objects) != 2:
            raise ValueError(f"hard scenes relate exactly 2 object groups, got {len(objects)}")
        return f"{_noun_phrase(objects[0])} {attributes['relation']} {_noun_phrase(objects[1])}"
    if tier == "hardest":
        text = attributes["text"]
        return (f"the word {text['word']} in {text['colour']} letters "
                f"on {_background_phrase(attributes['background'])}")
    raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")


def vocabulary() -> list[str]:
    """Returns every word that can appear in a caption, sorted (for a word-level tokenizer)."""
    words = set(_GRAMMAR_WORDS) | set(COLOURS) | set(SHAPES) | set(_PLURALS.values())
    words |= set(SIZES) | set(WORDS) | set(_COUNT_WORDS.values())
    words |= {k for k in BACKGROUND_KINDS if k != "plain"}  # plain backgrounds say only the colour
    for phrase in POSITIONS + RELATIONS:
        words |= set(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------- rendering


def _unit_polygon(points: np.ndarray, half_extent: float) -> np.ndarray:
    # Centre the bounding box on the origin and scale it to the requested half extent, so that
    # "center" and "radius" mean the same thing for every shape.
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2
    return points * (half_extent / np.abs(points).max())


def _make_unit_polygons() -> dict[str, np.ndarray]:
    def ring(n: int, radii: list[float]) -> np.ndarray:
        angles = -math.pi / 2 + np.arange(n) * 2 * math.pi / n
        r = np.resize(np.asarray(radii), n)
        return np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1)

    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], axis=1)
    # Half extents chosen so that shapes of one radius look about equally big.
    return {
        "square": _unit_polygon(ring(4, [1.0]) @ _rotation(math.pi / 4), 0.85),
        "triangle": _unit_polygon(ring(3, [1.0]), 1.0),
        "star": _unit_polygon(ring(10, [1.0, 0.45]), 1.05),
        "diamond": _unit_polygon(np.array([[0, -1], [0.72, 0], [0, 1], [-0.72, 0]], float), 1.0),
        "heart": _unit_polygon(heart, 0.95),
    }


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


_UNIT_POLYGONS = _make_unit_polygons()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, radius: float,
                fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
        return
    if shape not in _UNIT_POLYGONS:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    points = _UNIT_POLYGONS[shape] * radius + (cx, cy)
    draw.polygon([(float(x), float(y)) for x, y in points], fill=fill)


def _partner_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    # The second colour of a patterned background: a tint of a dark colour or a shade of a
    # light one. Deriving it from the named colour keeps "a red striped background" a complete
    # description, and all partners stay more than 85 RGB away from every palette colour.
    c = np.asarray(rgb, dtype=float)
    luma = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
    out = c * 0.6 if luma > 150 else c + 0.55 * (255 - c)
    return tuple(int(round(v)) for v in out)


@functools.lru_cache(maxsize=32)
def _pattern_mask(kind: str, canvas: int) -> np.ndarray:
    """True where a patterned background shows its partner colour. Shape (canvas, canvas)."""
    period = _PATTERN_PERIOD * canvas / BASE_RESOLUTION
    y, x = np.mgrid[0:canvas, 0:canvas] + 0.5
    if kind == "striped":
        return ((x + y) % (1.5 * period)) < 0.75 * period  # diagonal stripes, so never confused with a square's edge
    if kind == "dotted":
        dx = (x % period) - period / 2
        dy = (y % period) - period / 2
        return dx * dx + dy * dy < (0.22 * period) ** 2
    if kind == "checkered":
        return ((x // period + y // period) % 2) == 1
    raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUND_KINDS}")


def _colour_rgb(name: str) -> tuple[int, int, int]:
    if name == NEUTRAL_BACKGROUND:
        return NEUTRAL_RGB
    if name not in PALETTE:
        raise ValueError(f"unknown colour {name!r}; expected one of {COLOURS} or {NEUTRAL_BACKGROUND!r}")
    return PALETTE[name]


def _background(background: dict[str, str], canvas: int) -> Image.Image:
    rgb = _colour_rgb(background["colour"])
    if background["kind"] == "plain":
        return Image.new("RGB", (canvas, canvas), rgb)
    mask = _pattern_mask(background["kind"], canvas)[..., None]  # (H, W, 1)
    pixels = np.where(mask, np.asarray(_partner_colour(rgb), np.uint8), np.asarray(rgb, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=512)
def _fitted_font(word: str, canvas: int) -> tuple[ImageFont.FreeTypeFont, tuple[int, int, int, int]]:
    """The largest built-in font size at which ``word`` fits the text box, and its bbox."""
    reference = 100
    left, top, right, bottom = ImageFont.load_default(size=reference).getbbox(word)
    scale = min(_TEXT_WIDTH_FRACTION * canvas / (right - left),
                _TEXT_HEIGHT_FRACTION * canvas / (bottom - top))
    font = ImageFont.load_default(size=max(1, int(reference * scale)))
    return font, font.getbbox(word)


def render(attributes: dict[str, Any], size: int = BASE_RESOLUTION) -> Image.Image:
    """Draws a scene.

    Args:
        attributes: A scene as returned by :func:`sample_attributes`.
        size: Side of the square output image in pixels; geometry scales from 64.

    Returns:
        An RGB image of ``size`` x ``size``.

    Raises:
        ValueError: If ``size`` is not positive or the scene names an unknown shape or colour.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    canvas = size * SUPERSAMPLE
    scale = canvas / BASE_RESOLUTION
    image = _background(attributes["background"], canvas)
    draw = ImageDraw.Draw(image)
    for obj in attributes["objects"]:
        fill = _colour_rgb(obj["colour"])
        for cx, cy in obj["centers"]:
            _draw_shape(draw, obj["shape"], cx * scale, cy * scale, obj["radius"] * scale, fill)
    text = attributes.get("text")
    if text:
        font, (left, top, right, bottom) = _fitted_font(text["word"], canvas)
        cx, cy = text["center"][0] * scale, text["center"][1] * scale
        # Centre the ink box, not the anchor: uppercase letters have no descenders, so the
        # font's own middle anchor would sit them visibly high.
        draw.text((cx - (left + right) / 2, cy - (top + bottom) / 2), text["word"], font=font,
                  fill=_colour_rgb(text["colour"]))
    return image.reduce(SUPERSAMPLE)  # box average of each 4x4 block
