"""MS-COCO captions (2014), the paper's COCO setting.

Layout under ``--data-root`` (as unpacked from the official archives)::

    annotations/captions_train2014.json   # split "train"
    annotations/captions_val2014.json     # split "validation" (or "val")
    train2014/COCO_train2014_000000000009.jpg ...
    val2014/COCO_val2014_000000000042.jpg ...

When the 2014 annotation file of the split is absent, the 2017 names
(``annotations/captions_{train,val}2017.json`` with ``{train,val}2017/``) are used instead.

The annotation file is the official captions JSON: ``images`` (``id``, ``file_name``, ...),
``annotations`` (``id``, ``image_id``, ``caption``), plus ``info`` and ``licenses``, which are
ignored. COCO has about five captions per image. ``captions="first"`` (the default) gives one
item per image, captioned by its annotation with the smallest id: a fixed choice, so prompt
routing and embedding caches see the same caption every epoch. ``captions="all"`` gives one
item per (image, caption) pair. Items are ordered by image id (then annotation id); images
without a caption are left out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from PIL import Image

from aptp.data.common import CaptionDataset, ImageTransform, canonical_split, clean_caption, decode_image
from aptp.errors import DataError

logger = logging.getLogger(__name__)

CaptionMode = Literal["first", "all"]

# (annotation file, image folder) per split, in the order they are looked for.
LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("annotations/captions_train2014.json", "train2014"),
              ("annotations/captions_train2017.json", "train2017")),
    "validation": (("annotations/captions_val2014.json", "val2014"),
                   ("annotations/captions_val2017.json", "val2017")),
}


class CocoCaptions(CaptionDataset):
    """COCO images with their captions (see the module docstring for the layout).

    Args:
        root: The COCO root folder.
        transform: Image transform.
        split: ``"train"`` or ``"validation"`` (``"val"``).
        captions: ``"first"``: one item per image with its first caption; ``"all"``: one item
            per caption.
        max_samples: Keep only the first this many items; None for all.

    Raises:
        DataError: Missing root, annotation file or image folder, malformed JSON, or no captioned
            image.
    """

    kind = "coco"

    def __init__(self, root: str | Path, transform: ImageTransform, split: str = "train",
                 captions: CaptionMode = "first", max_samples: int | None = None) -> None:
        super().__init__(transform)
        if captions not in ("first", "all"):
            raise ValueError(f"captions must be 'first' or 'all', got {captions!r}")
        self.root = Path(root).expanduser()
        self.split = canonical_split(split)
        if not self.root.is_dir():
            raise DataError(f"COCO root {self.root} is not a folder; pass the folder that holds "
                            "annotations/ and train2014/ as --data-root")
        layouts = LAYOUTS[self.split]
        for annotation_file, image_folder in layouts:
            if (self.root / annotation_file).is_file():
                break
        else:
            expected = " or ".join(a for a, _ in layouts)
            raise DataError(f"COCO root {self.root} has no {expected}; pass the folder that holds "
                            "the unpacked COCO captions annotations as --data-root")
        self.annotation_path = self.root / annotation_file
        self.image_dir = self.root / image_folder
        self._files, self._captions = _read_coco(self.annotation_path, captions)
        if max_samples is not None:
            self._files, self._captions = self._files[:max_samples], self._captions[:max_samples]
        if not self._files:
            raise DataError(f"{self.annotation_path} lists no captioned image; is it a COCO captions file?")
        if not self.image_dir.is_dir():
            # Single missing images are skipped and counted; a missing folder is a wrong root.
            raise DataError(f"COCO root {self.root} has {annotation_file} but no {image_folder}/ image "
                            "folder; unpack the images there")

    def describe(self, index: int) -> str:
        return str(self.image_dir / self._files[index])

    def _open_image(self, index: int) -> Image.Image:
        return decode_image(self.image_dir / self._files[index], self.transform.resolution)


def _read_coco(path: Path, mode: CaptionMode) -> tuple[list[str], list[str]]:
    """Returns parallel lists (image file name, caption), ordered by image id then annotation id."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); re-download it") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path} is not a COCO captions file: expected a JSON object with "
                        "'images' and 'annotations' lists")
    try:
        files = {int(image["id"]): str(image["file_name"]) for image in data["images"]}
        by_image: dict[int, list[tuple[int, str]]] = {}
        orphans = 0
        for ann in data["annotations"]:
            image_id, text = int(ann["image_id"]), clean_caption(ann["caption"])
            if image_id not in files:
                orphans += 1
                continue
            if text:
                by_image.setdefault(image_id, []).append((int(ann["id"]), text))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: malformed COCO entry (missing or bad {exc}); expected images with "
                        "id/file_name and annotations with id/image_id/caption") from None
    if orphans:
        logger.warning("%s: %d captions refer to images that are not listed; ignored", path, orphans)
    names: list[str] = []
    texts: list[str] = []
    for image_id in sorted(by_image):
        anns = sorted(by_image[image_id])
        for _, text in anns if mode == "all" else anns[:1]:
            names.append(files[image_id])
            texts.append(text)
    return names, texts
