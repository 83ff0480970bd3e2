"""Webdataset ``.tar`` shards, as written by img2dataset (``--output_format webdataset``).

Layout: a folder of uncompressed tar files (``00000.tar``, ``00001.tar``, ...), read in sorted
name order; other files beside them (img2dataset's ``*.parquet`` and ``*_stats.json``) are ignored.
Members are grouped into samples by key, the webdataset convention: the member path up to the
first dot of its file name (``000000001.jpg``, ``000000001.txt`` and ``000000001.json`` form
sample ``000000001``). A sample's caption is its ``.txt`` member (UTF-8), or else the
``"caption"`` field of its ``.json`` member; samples without a caption are left out. Its image is
the first of ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` present; a captioned sample without one, or
with undecodable image bytes, is unreadable and skipped (see :mod:`aptp.data.common`).

Shards are indexed once with the standard library's :mod:`tarfile` (headers and captions only),
recording each image's byte offset; reading an item is then one seek and read, so the data set
is map-style and works with any number of DataLoader workers. The ``webdataset`` package is not
needed. A shard that ends early (interrupted download) keeps the samples before the damage.
"""

from __future__ import annotations

import json
import logging
import tarfile
from pathlib import Path

from PIL import Image

from aptp.data.common import CaptionDataset, ImageTransform, clean_caption, decode_image
from aptp.errors import DataError

logger = logging.getLogger(__name__)

SHARD_PATTERN = "*.tar"
IMAGE_MEMBER_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

# An image member: (shard number, byte offset of its data, size in bytes).
_Location = tuple[int, int, int]


def find_shards(root: Path) -> list[Path]:
    """Returns the ``*.tar`` files directly in ``root``, sorted by name."""
    return sorted(p for p in root.glob(SHARD_PATTERN) if p.is_file())


class WebDatasetShards(CaptionDataset):
    """Captioned images stored in webdataset tar shards (see the module docstring).

    Args:
        root: Folder holding the ``*.tar`` shards.
        transform: Image transform.
        max_samples: Keep only the first this many samples; None for all. Indexing stops once
            enough are found, so a small subset of a large data set opens quickly.
        kind: Name used in messages.

    Raises:
        DataError: No shard in ``root``, or no captioned sample in any shard.
    """

    kind = "webdataset"

    def __init__(self, root: str | Path, transform: ImageTransform, max_samples: int | None = None,
                 kind: str = "webdataset") -> None:
        super().__init__(transform)
        self.kind = kind
        self.root = Path(root).expanduser()
        self.shards = find_shards(self.root)
        if not self.shards:
            raise DataError(f"no {SHARD_PATTERN} shards in {self.root}; pass the folder of webdataset shards")
        self._keys: list[str] = []
        self._images: list[_Location | None] = []
        for number, shard in enumerate(self.shards):
            self._index_shard(number, shard, max_samples)
            if max_samples is not None and len(self._captions) >= max_samples:
                break
        if not self._captions:
            raise DataError(f"the {len(self.shards)} shard(s) in {self.root} hold no captioned sample "
                            "(.txt member, or .json with a 'caption')")

    def _index_shard(self, number: int, shard: Path, max_samples: int | None) -> None:
        # key -> {extension: member}; dicts keep the order in which keys first appear.
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                try:
                    for member in tar:
                        if not member.isfile():
                            continue
                        directory, _, name = member.name.rpartition("/")
                        stem, dot, extension = name.partition(".")
                        if not dot or not stem:
                            continue
                        key = f"{directory}/{stem}" if directory else stem
                        samples.setdefault(key, {})[extension.lower()] = member
                except (tarfile.TarError, OSError) as exc:
                    logger.warning("shard %s is damaged after %d samples (%s); using those",
                                   shard, len(samples), exc)
                for key, members in samples.items():
                    if max_samples is not None and len(self._captions) >= max_samples:
                        return
                    caption = _member_caption(tar, members)
                    if not caption:
                        continue
                    image = next((members[e] for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
                    self._captions.append(caption)
                    self._keys.append(f"{shard.name}:{key}")
                    self._images.append(None if image is None else (number, image.offset_data, image.size))
        except (tarfile.TarError, OSError) as exc:
            logger.warning("skipping unreadable shard %s (%s)", shard, exc)

    def describe(self, index: int) -> str:
        return f"{self.root}/{self._keys[index]}"

    def _open_image(self, index: int) -> Image.Image:
        location = self._images[index]
        if location is None:
            raise FileNotFoundError(f"sample has no image member ({', '.join(IMAGE_MEMBER_EXTENSIONS)})")
        number, offset, size = location
        with open(self.shards[number], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise OSError(f"shard ends {size - len(data)} bytes into the image")
        return decode_image(data, self.transform.resolution)


def _member_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str:
    """The caption of one sample: its .txt member, else the 'caption' of its .json member."""
    try:
        if "txt" in members:
            return clean_caption(_read_member(tar, members["txt"]).decode("utf-8", errors="replace"))
        if "json" in members:
            meta = json.loads(_read_member(tar, members["json"]))
            return clean_caption(meta.get("caption")) if isinstance(meta, dict) else ""
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError):
        pass
    return ""


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise OSError(f"{member.name} is not a regular file")
    return handle.read()
