"""What every captioned-image data set shares: the image transform and unreadable-image skipping.

Every loader in :mod:`aptp.data` is a map-style :class:`CaptionDataset`. Item ``i`` is a dict:

- ``pixel_values``: float tensor (3, R, R) in [-1, 1];
- ``caption``: str;
- ``index``: int, the index of the item actually returned (see skipping below), so that
  ``captions()[sample["index"]] == sample["caption"]``;
- ``skipped``: int, 1 when the requested item's image was unreadable and this sample stands in
  for it, else 0;
- some sources add ``tier`` (str) and ``attributes`` (JSON string), for every item alike.

All values are tensors, numbers or strings, so ``torch.utils.data.default_collate`` batches them.
:meth:`CaptionDataset.captions` lists every caption in index order without decoding any image
(for prompt routing and embedding caches).

Unreadable images (missing file, truncated or corrupt data, not an image) are never fatal. A
map-style dataset can not drop an item after its length is known, so item ``i`` whose image
fails is replaced by the next readable item ``i+1, i+2, ...`` (wrapping around): a pure
function of ``i`` and the files, the same on every worker and process. The stand-in carries
``skipped=1``, and only the *requested* item is charged, so summing ``batch["skipped"]`` over one
pass over the data set gives the exact number of unreadable items, however many DataLoader
workers or processes there are (each sums its own batches; all-reduce the total across processes).
Within one process :attr:`CaptionDataset.skipped` also counts the distinct unreadable items seen
there; with ``num_workers > 0`` those counters live in the worker processes, hence the per-sample
field. :meth:`CaptionDataset.scan` checks every image up front when a full report is wanted.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from aptp.errors import DataError

logger = logging.getLogger(__name__)

# Canonical split names, and the spellings accepted for them.
SPLITS: dict[str, str] = {"train": "train", "training": "train", "val": "validation",
                          "valid": "validation", "validation": "validation"}

# Everything PIL raises for a file that is missing, truncated, corrupt or not an image.
# (UnidentifiedImageError is an OSError; some plugins raise SyntaxError or ValueError.)
UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
)

# Per-process warnings about unreadable images; later ones go to DEBUG so that a data set with
# thousands of dead links (about 8% of CC3M's URLs) does not flood the log.
_MAX_WARNINGS = 5

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def canonical_split(split: str) -> str:
    """Returns ``"train"`` or ``"validation"`` for the accepted spellings of a split.

    Raises:
        DataError: For any other split name.
    """
    key = split.strip().lower()
    if key not in SPLITS:
        raise DataError(f"unknown data split {split!r}; expected one of: train, validation (or val)")
    return SPLITS[key]


class ImageTransform:
    """RGB image → float tensor (3, R, R) in [-1, 1], as in Stable Diffusion training scripts.

    The shorter side is resized to ``resolution`` with bicubic filtering (PIL filters over the
    whole source footprint when shrinking, i.e. antialiased), then the image is cropped to a
    square, centred or at a random offset, and optionally flipped left-right. Random crops and
    flips draw from torch's global generator, which a ``DataLoader`` seeds per worker from its own
    generator, so a seeded loader gives the same crops every run.

    Args:
        resolution: Side R of the output, positive.
        center_crop: Crop the centre; False crops at a random offset.
        random_flip: Flip horizontally with probability 0.5.

    Raises:
        ValueError: If ``resolution`` is not positive.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __repr__(self) -> str:
        return (f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, "
                f"random_flip={self.random_flip})")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        r = self.resolution
        w, h = image.size
        scale = r / min(w, h)
        # max(r, ...) guards against rounding the shorter side to r - 1.
        size = (max(r, round(w * scale)), max(r, round(h * scale)))
        if size != (w, h):
            image = image.resize(size, Image.Resampling.BICUBIC)
        w, h = size
        if self.center_crop:
            left, top = (w - r) // 2, (h - r) // 2
        else:
            left = int(torch.randint(0, w - r + 1, ()).item())
            top = int(torch.randint(0, h - r + 1, ()).item())
        image = image.crop((left, top, left + r, top + r))
        if self.random_flip and torch.rand(()).item() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))  # (R, R, 3) in [0, 255]
        return pixels.permute(2, 0, 1) / 127.5 - 1.0  # (3, R, R) in [-1, 1]


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts to RGB; transparent pixels become white rather than the colour hidden under them."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source: str | os.PathLike[str] | bytes | BinaryIO, min_size: int | None = None) -> Image.Image:
    """Opens and fully decodes an image as RGB, so that truncated data fails here and not later.

    Args:
        source: A path, the encoded bytes, or a binary file object.
        min_size: If given, JPEGs may be decoded at a reduced scale (DCT scaling) as long as both
            sides stay at least this large; much faster for large photos and a small training size.

    Raises:
        One of :data:`UNREADABLE_ERRORS` when the image is missing or can not be decoded.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as image:
        if min_size is not None and image.format == "JPEG":
            image.draft("RGB", (min_size, min_size))
        image.load()  # decodes everything; raises OSError on truncated data
        rgb = to_rgb(image)
        # Closing the file may release the pixels (or an mmap of them): return an independent image.
        return rgb.copy() if rgb is image else rgb


class CaptionDataset(Dataset):
    """Base class of the captioned-image data sets (see the module docstring for the item format).

    Subclasses fill ``self._captions`` (one caption per item, in index order) and implement
    :meth:`_open_image`, :meth:`describe` and, for extra per-item fields, :meth:`_extras`;
    skipping, the transform and the counters live here.

    Args:
        transform: Turns a decoded image into the ``pixel_values`` tensor.
    """

    #: Short name of the source, for messages ("coco", "cc3m-tsv", ...).
    kind: str = "images"

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform
        self._captions: list[str] = []
        # Unreadable item indices seen in this process, with why; grows as items are read.
        self._unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._captions)

    def caption(self, index: int) -> str:
        """Returns the caption of item ``index`` without decoding its image."""
        return self._captions[index]

    def describe(self, index: int) -> str:
        """Where item ``index``'s image lives, for messages (a path or shard member)."""
        return f"item {index}"

    def _open_image(self, index: int) -> Image.Image:
        """Returns the decoded image of item ``index``; raises one of :data:`UNREADABLE_ERRORS`."""
        raise NotImplementedError

    def _extras(self, index: int) -> dict[str, Any]:
        """Extra fields of item ``index`` (the same keys for every item)."""
        return {}

    def captions(self) -> list[str]:
        """Returns every caption in index order; decodes no image."""
        return list(self._captions)

    @property
    def skipped(self) -> int:
        """Distinct unreadable items found in this process so far (see the module docstring)."""
        return len(self._unreadable)

    @property
    def unreadable(self) -> dict[int, str]:
        """Index → reason of the unreadable items found in this process so far."""
        return dict(self._unreadable)

    def _try_image(self, index: int) -> Image.Image | None:
        if index in self._unreadable:
            return None
        try:
            return self._open_image(index)
        except UNREADABLE_ERRORS as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._unreadable[index] = reason
            log = logger.warning if len(self._unreadable) <= _MAX_WARNINGS else logger.debug
            log("skipping unreadable image of %s %s (%s)", self.kind, self.describe(index), reason)
            if len(self._unreadable) == _MAX_WARNINGS:
                logger.warning("further unreadable images are logged at DEBUG level only")
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {self.kind} data set of size {n}")
        for step in range(n):
            current = (index + step) % n
            image = self._try_image(current)
            if image is not None:
                return {"pixel_values": self.transform(image), "caption": self.caption(current),
                        "index": current, "skipped": int(step > 0), **self._extras(current)}
        raise DataError(
            f"no readable image in the {self.kind} data set ({n} items, e.g. {self.describe(index)}: "
            f"{self._unreadable.get(index, '?')}); check the image files"
        )

    def scan(self) -> list[int]:
        """Decodes every image once and returns the indices of the unreadable ones (slow)."""
        return [i for i in range(len(self)) if self._try_image(i) is None]


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields (line number, object) for each non-blank line of a JSON-lines file.

    Raises:
        DataError: A line that is not a JSON object, naming the file and line.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON ({exc.msg}); fix or remove it") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} must be a JSON object, got {type(record).__name__}")
            yield number, record


def clean_caption(text: Any) -> str:
    """Returns ``text`` with surrounding whitespace removed; '' for anything but a string."""
    return text.strip() if isinstance(text, str) else ""
