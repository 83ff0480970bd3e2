"""The shapes world's splits: random-access samples, a torch data set and an image-folder export.

:mod:`aptp.data.shapes` defines a scene (the grammar, its captions and the renderer); this module
turns a seed into fixed splits of such scenes. Sample ``index`` of a split is a pure function of
``(seed, split, index)``: its generator is derived from ``np.random.SeedSequence([seed, split_id,
index])``, and its tier from a seeded order within its block of :data:`TIER_BLOCK_SIZE`, so any
index can be drawn alone, in any order, on any worker, with byte-identical PNGs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from aptp.data.shapes import (
    BASE_RESOLUTION,
    SPLIT_IDS,
    SPLIT_SIZES,
    TIER_BLOCK_SIZE,
    TIER_COUNTS,
    TIERS,
    caption_from_attributes,
    render,
    sample_attributes,
    vocabulary,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapeSample:
    """One sample of the shapes world.

    Attributes:
        image: The 64x64 RGB image.
        caption: The caption, always ``caption_from_attributes(attributes)``.
        tier: One of :data:`TIERS`.
        attributes: JSON-serialisable scene description the image and caption were made from.
    """

    image: Image.Image
    caption: str
    tier: str
    attributes: dict[str, Any]

    def png_bytes(self) -> bytes:
        """Returns the image encoded as PNG (deterministic for identical pixels)."""
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


_TIER_BLOCK: tuple[str, ...] = tuple(t for t in TIERS for _ in range(TIER_COUNTS[t]))
if len(_TIER_BLOCK) != TIER_BLOCK_SIZE:
    raise ValueError(f"TIER_COUNTS {TIER_COUNTS} must sum to TIER_BLOCK_SIZE={TIER_BLOCK_SIZE}")


def _is_int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


class ShapesWorld:
    """The shapes world for one seed: fixed splits of random-access, deterministic samples.

    Args:
        seed: Non-negative integer; different seeds give different worlds.
        train_size: Samples in the train split (default 20,000). A sample is a pure function of
            (seed, split, index), so a larger train split keeps the default one as its first
            20,000 samples and never meets the validation split.

    Raises:
        ValueError: If ``seed`` is negative or not an integer, or ``train_size`` is not positive.
    """

    def __init__(self, seed: int = 0, train_size: int | None = None) -> None:
        if not _is_int(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if train_size is not None and (not _is_int(train_size) or train_size < 1):
            raise ValueError(f"train_size must be a positive integer, got {train_size!r}")
        self.seed = int(seed)
        self.sizes = {**SPLIT_SIZES, **({} if train_size is None else {"train": int(train_size)})}

    def __repr__(self) -> str:
        extra = "" if self.sizes == SPLIT_SIZES else f", train_size={self.sizes['train']}"
        return f"ShapesWorld(seed={self.seed}{extra})"

    def split_size(self, split: str) -> int:
        """Returns the number of samples in ``split`` (``train``: 20,000 unless the world was built
        with another ``train_size``; ``validation``: 2,000)."""
        self._split_id(split)
        return self.sizes[split]

    def _split_id(self, split: str) -> int:
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLIT_IDS)}")
        return SPLIT_IDS[split]

    def _check_index(self, split: str, index: int) -> int:
        split_id = self._split_id(split)
        if not 0 <= index < self.sizes[split]:
            raise IndexError(f"index {index} out of range for split {split!r} of size {self.sizes[split]}")
        return split_id

    def tier(self, split: str, index: int) -> str:
        """Returns the tier of one sample without drawing it (cheap; e.g. for weighted sampling)."""
        split_id = self._check_index(split, index)
        block = index // TIER_BLOCK_SIZE
        # spawn_key keeps this stream apart from the per-sample streams: SeedSequence pads
        # entropy with zeros, so [seed, split, block, 0] would collide with [seed, split, block].
        sequence = np.random.SeedSequence([self.seed, split_id, block], spawn_key=(1,))
        order = np.random.default_rng(sequence).permutation(TIER_BLOCK_SIZE)
        return _TIER_BLOCK[int(order[index % TIER_BLOCK_SIZE])]

    def attributes(self, split: str, index: int) -> dict[str, Any]:
        """Returns the scene of one sample without rendering it."""
        split_id = self._check_index(split, index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, split_id, index]))
        return sample_attributes(rng, self.tier(split, index))

    def sample(self, split: str, index: int) -> ShapeSample:
        """Returns sample ``index`` of ``split``: a pure function of (seed, split, index).

        Raises:
            ValueError: If ``split`` is unknown.
            IndexError: If ``index`` is outside the split.
        """
        attributes = self.attributes(split, index)
        return ShapeSample(image=render(attributes), caption=caption_from_attributes(attributes),
                           tier=attributes["tier"], attributes=attributes)

    def vocabulary(self) -> list[str]:
        """Returns every word that can appear in a caption, sorted."""
        return vocabulary()

    def captions(self, split: str, n: int | None = None) -> list[str]:
        """Returns the captions of the first ``n`` samples of ``split`` (all when None)."""
        total = self.split_size(split)
        n = total if n is None else n
        if not 0 <= n <= total:
            raise ValueError(f"n={n} must be between 0 and the size of split {split!r} ({total})")
        return [caption_from_attributes(self.attributes(split, i)) for i in range(n)]


class ShapesDataset(Dataset):
    """A torch dataset over one split of a :class:`ShapesWorld`.

    Items are dicts: ``pixel_values`` (float tensor (3, R, R) in [-1, 1]), ``caption``,
    ``tier``, ``attributes`` (JSON string, so the default collate can batch it) and ``index``.

    Args:
        split: ``"train"`` or ``"validation"``.
        size: Number of samples (the first ``size`` of the split); None for the whole split.
        seed: World seed; None means 0, or ``world.seed`` when ``world`` is given.
        resolution: Side R of the returned images; other than 64 the 64 px render is resized
            with bicubic filtering, so every resolution shows the same scene.
        world: An existing world to read from; its seed must agree with ``seed`` if both are given.

    Raises:
        ValueError: For an unknown split, a size outside the split, a non-positive resolution,
            or a ``seed`` that disagrees with ``world.seed``.
    """

    def __init__(self, split: str = "train", size: int | None = None, seed: int | None = None,
                 resolution: int = BASE_RESOLUTION, world: ShapesWorld | None = None) -> None:
        if world is None:
            world = ShapesWorld(0 if seed is None else seed)
        elif seed is not None and seed != world.seed:
            raise ValueError(f"seed={seed} disagrees with world.seed={world.seed}; pass only one")
        total = world.split_size(split)
        size = total if size is None else size
        if not 0 <= size <= total:
            raise ValueError(f"size={size} must be between 0 and the size of split {split!r} ({total})")
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.world, self.split, self.size, self.resolution = world, split, size, resolution

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for dataset of size {self.size}")
        sample = self.world.sample(self.split, index)
        image = sample.image
        if self.resolution != BASE_RESOLUTION:
            image = image.resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (R, R, 3) in [0, 255]
        pixels = pixels.permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R) in [-1, 1]
        return {"pixel_values": pixels, "caption": sample.caption, "tier": sample.tier,
                "attributes": json.dumps(sample.attributes, sort_keys=True), "index": index}


def _atomic_write(path: Path, data: bytes) -> None:
    # A crash mid-export must not leave a truncated PNG that a later loader reads as valid.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_image_folder(out_dir: str | os.PathLike[str], split: str, n: int, seed: int = 0,
                        tiers: Sequence[str] | None = None) -> Path:
    """Writes the first ``n`` samples of ``split`` as an image folder.

    The layout is the diffusers / Hugging Face ``imagefolder`` convention: ``000000.png``, ... and
    a ``metadata.jsonl`` with one ``{"file_name", "text", "tier", "attributes", "index"}`` object
    per line (``index``: the sample's index in the split).

    Args:
        out_dir: Folder to write into; created if missing. Files of the same names are replaced.
        split: ``"train"`` or ``"validation"``.
        n: Number of samples, at most the split size.
        seed: World seed.
        tiers: Only the samples of these tiers, among the split's first ``n`` (the tier is read
            without drawing the sample): e.g. ``["medium"]`` for a tier's training prompts alone.

    Returns:
        The output folder.

    Raises:
        ValueError: For an unknown split or tier, or ``n`` outside the split.
    """
    world = ShapesWorld(seed)
    total = world.split_size(split)
    if not 0 <= n <= total:
        raise ValueError(f"n={n} must be between 0 and the size of split {split!r} ({total})")
    unknown = sorted(set(tiers or ()) - set(TIERS))
    if unknown:
        raise ValueError(f"unknown tiers {unknown}; choose from {list(TIERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        if tiers is not None and world.tier(split, index) not in tiers:
            continue
        sample = world.sample(split, index)
        file_name = f"{index:06d}.png"
        _atomic_write(out / file_name, sample.png_bytes())
        record = {"file_name": file_name, "text": sample.caption, "tier": sample.tier,
                  "attributes": sample.attributes, "index": index}
        lines.append(json.dumps(record, sort_keys=True))
    # Metadata last, so a folder with a metadata.jsonl always has every image it lists.
    _atomic_write(out / "metadata.jsonl", ("\n".join(lines) + "\n" if lines else "").encode())
    logger.info("wrote %d %s samples (seed %d) to %s", len(lines), split, seed, out)
    return out
