"""An image folder with captions in ``metadata.jsonl``: the diffusers / Hugging Face convention.

Layout (``--data PATH``)::

    PATH/metadata.jsonl          # one JSON object per line
    PATH/000000.png              # any image format PIL reads, in subfolders too

Each line needs ``file_name`` (the image path relative to the folder of ``metadata.jsonl``) and
``text`` (the caption; ``caption`` is accepted when ``text`` is absent). When
``PATH/metadata.jsonl`` is absent, ``PATH/<split>/metadata.jsonl`` is used (``train/``, or
``validation/`` then ``val/``), the Hugging Face split convention. Items keep the order of the
lines; lines with an empty caption are left out. When every line carries a string ``tier`` and
an ``attributes`` value (folders written by :func:`aptp.data.shapes_world.export_image_folder` do),
items carry them too, ``attributes`` as a JSON string, as :class:`~aptp.data.shapes_world.ShapesDataset`
returns them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from aptp.data.common import CaptionDataset, ImageTransform, canonical_split, clean_caption, decode_image, read_jsonl
from aptp.errors import DataError

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"
SPLIT_FOLDERS: dict[str, tuple[str, ...]] = {"train": ("train",), "validation": ("validation", "val")}


def find_metadata(folder: Path, split: str) -> Path | None:
    """Returns ``folder/metadata.jsonl``, else that of the split's subfolder, else None."""
    candidates = [folder / METADATA_FILE]
    candidates += [folder / sub / METADATA_FILE for sub in SPLIT_FOLDERS[canonical_split(split)]]
    return next((c for c in candidates if c.is_file()), None)


class ImageFolder(CaptionDataset):
    """Images listed with their captions in ``metadata.jsonl`` (see the module docstring).

    Args:
        path: The image folder.
        transform: Image transform.
        split: Picks ``<split>/metadata.jsonl`` when the folder has no top-level one.
        max_samples: Keep only the first this many items; None for all.

    Raises:
        DataError: No folder, no ``metadata.jsonl``, malformed lines, or no captioned line.
    """

    kind = "image folder"

    def __init__(self, path: str | Path, transform: ImageTransform, split: str = "train",
                 max_samples: int | None = None) -> None:
        super().__init__(transform)
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise DataError(f"image folder {self.path} does not exist or is not a folder")
        metadata = find_metadata(self.path, split)
        if metadata is None:
            raise DataError(f"image folder {self.path} has no {METADATA_FILE} (lines of "
                            '{"file_name": ..., "text": ...}); add one or pass another --data')
        self.metadata_path = metadata
        self.image_dir = metadata.parent
        self._files: list[str] = []
        tiers: list[Any] = []
        attributes: list[Any] = []
        for number, record in read_jsonl(metadata):
            if max_samples is not None and len(self._files) >= max_samples:
                break
            file_name = record.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise DataError(f"{metadata} line {number} has no 'file_name' string; every line needs "
                                "file_name and text")
            caption = clean_caption(record.get("text", record.get("caption")))
            if not caption:
                continue
            self._files.append(file_name)
            self._captions.append(caption)
            tiers.append(record.get("tier"))
            attributes.append(record.get("attributes"))
        if not self._files:
            raise DataError(f"{metadata} lists no image with a caption ('text'); the data set is empty")
        # Extra fields only when every item has them, so that batches always have the same keys.
        self._tiers = tiers if all(isinstance(t, str) for t in tiers) else None
        self._attributes = ([a if isinstance(a, str) else json.dumps(a, sort_keys=True) for a in attributes]
                            if self._tiers is not None and all(a is not None for a in attributes) else None)

    def describe(self, index: int) -> str:
        return str(self.image_dir / self._files[index])

    def _open_image(self, index: int) -> Image.Image:
        return decode_image(self.image_dir / self._files[index], self.transform.resolution)

    def _extras(self, index: int) -> dict[str, Any]:
        extras: dict[str, Any] = {}
        if self._tiers is not None:
            extras["tier"] = self._tiers[index]
        if self._attributes is not None:
            extras["attributes"] = self._attributes[index]
        return extras
