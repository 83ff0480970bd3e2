"""``build_dataset``: one entry point from :class:`~aptp.settings.DataSettings` to a data set.

``data.name`` selects the source, by exact value, never by looking inside a path:

- ``shapes`` — the embedded synthetic world (:mod:`aptp.data.shapes`); ``root`` is not used;
- ``coco`` — COCO captions under ``root`` (required; :mod:`aptp.data.coco`);
- ``cc3m`` — Conceptual Captions under ``root`` (required), as webdataset shards, the official
  TSV with an image folder, or img2dataset folders (:mod:`aptp.data.cc3m` says how it tells);
- anything else — a path to an image folder with ``metadata.jsonl`` (:mod:`aptp.data.imagefolder`).
  A folder that happens to be called ``shapes``, ``coco`` or ``cc3m`` is reached as ``./coco``.

Every result is a :class:`~aptp.data.common.CaptionDataset`: items with ``pixel_values``,
``caption``, ``index`` and ``skipped`` (plus ``tier``/``attributes`` where the source has them),
and a ``captions()`` listing that decodes no image.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image

from aptp.data.cc3m import open_cc3m
from aptp.data.coco import CaptionMode, CocoCaptions
from aptp.data.common import CaptionDataset, ImageTransform, canonical_split
from aptp.data.imagefolder import ImageFolder
from aptp.data.shapes import SPLIT_SIZES, caption_from_attributes
from aptp.data.shapes_world import ShapesDataset, ShapesWorld
from aptp.errors import DataError
from aptp.settings import DataSettings

logger = logging.getLogger(__name__)

BUILTIN: tuple[str, ...] = ("shapes", "coco", "cc3m")


def build_dataset(settings: DataSettings, split: str | None = None, *, captions: CaptionMode = "first",
                  seed: int = 0) -> CaptionDataset:
    """Builds the data set that ``settings`` describes.

    Args:
        settings: The ``data`` section of the settings (name, root, resolution, crop, flip,
            max_samples, split).
        split: Overrides ``settings.split`` (e.g. ``"validation"`` for evaluation prompts).
        captions: COCO only: ``"first"`` (one item per image, its first caption) or ``"all"``
            (one item per caption).
        seed: Shapes only: the world's seed (0 is the world the embedded toy model knows).

    Returns:
        A map-style :class:`~aptp.data.common.CaptionDataset` in a deterministic order, holding at
        most ``settings.max_samples`` items.

    Raises:
        DataError: Unknown name or path, missing ``--data-root``, a root without the expected
            files, or an empty data set; one line saying what to pass instead.
    """
    name = settings.name
    split = canonical_split(split if split is not None else settings.split)
    transform = ImageTransform(settings.resolution, settings.center_crop, settings.random_flip)
    if name in ("coco", "cc3m"):
        if settings.root is None:
            raise DataError(f"--data {name} needs --data-root: the folder holding the {name.upper()} files")
        if name == "coco":
            return CocoCaptions(settings.root, transform, split=split, captions=captions,
                                max_samples=settings.max_samples)
        return open_cc3m(settings.root, transform, split=split, max_samples=settings.max_samples)
    if settings.root is not None:
        logger.warning("--data-root %s is only used with --data coco or cc3m; ignored for --data %s",
                       settings.root, name)
    if name == "shapes":
        if settings.random_flip:
            raise DataError("--data shapes can not use random flips: mirroring breaks captions such as "
                            "'left of' and rendered words; set data.random_flip to false")
        return ShapesCaptions(split, transform, max_samples=settings.max_samples, seed=seed)
    path = Path(name).expanduser()
    if not path.exists():
        raise DataError(f"--data {name!r} is neither one of {', '.join(BUILTIN)} nor an existing folder; "
                        "pass a data set name or the path of an image folder with metadata.jsonl")
    return ImageFolder(path, transform, split=split, max_samples=settings.max_samples)


class ShapesCaptions(CaptionDataset):
    """The shapes world behind the common interface: a thin adapter over :class:`ShapesDataset`.

    Items are exactly ``ShapesDataset``'s (rendered at the resolution, never cropped or flipped)
    plus ``skipped=0``: synthetic images are always readable. ``captions()`` derives captions
    from the scene attributes without rendering.

    Args:
        split: ``"train"`` or ``"validation"``.
        transform: Only its resolution is used.
        max_samples: The first this many samples of the split; None for the whole split. The
            validation split is capped at its 2,000; the train split grows past its default
            20,000 (the world generates as many as asked, the first 20,000 unchanged).
        seed: World seed.
    """

    kind = "shapes"

    def __init__(self, split: str, transform: ImageTransform, max_samples: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(transform)
        grow = split == "train" and max_samples is not None and max_samples > SPLIT_SIZES["train"]
        world = ShapesWorld(seed, train_size=max_samples if grow else None)  # the generated world has more to give
        total = world.split_size(split)
        size = total if max_samples is None else min(max_samples, total)
        self.shapes = ShapesDataset(split, size=size, resolution=transform.resolution, world=world)

    def __len__(self) -> int:
        return len(self.shapes)

    def caption(self, index: int) -> str:
        return caption_from_attributes(self.shapes.world.attributes(self.shapes.split, index))

    def captions(self) -> list[str]:
        return self.shapes.world.captions(self.shapes.split, len(self))

    def describe(self, index: int) -> str:
        return f"{self.shapes.split} sample {index}"

    def _open_image(self, index: int) -> Image.Image:
        return self.shapes.world.sample(self.shapes.split, index).image

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.shapes[index], "skipped": 0}
