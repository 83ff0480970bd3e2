"""Conceptual Captions (CC3M), the paper's CC3M setting, in the three layouts people have on disk.

Google distributes only captions and URLs; the images come from a downloader. ``--data-root``
is recognised as exactly one of these layouts, checked in this order (by the files present in
the folder itself, never by its name):

1. **Webdataset shards** — ``*.tar`` directly in the root (img2dataset ``--output_format
   webdataset``: ``00000.tar`` with ``KEY.jpg``/``KEY.txt``/``KEY.json`` members). See
   :mod:`aptp.data.shards`.
2. **TSV + image folder** — the official TSV of the split in the root:
   ``Train_GCC-training.tsv`` (split ``train``) or ``Validation_GCC-1.1.0-Validation.tsv``
   (split ``validation``). Each line is ``caption<TAB>url``, no header; an optional third
   column gives the image path relative to the root. Without it, the image of line ``r``
   (0-based, counting every line, so numbers stay those of the official file) is the first
   file that exists of

   - ``<folder>/<r>_<crc>`` — what the common downloader (igorbrigadir/DownloadConceptualCaptions,
     also read by the official APTP code) writes: no extension, ``<crc>`` the unsigned CRC-32 of
     the URL's UTF-8 bytes, in decimal;
   - ``<folder>/<crc>`` — that downloader's earlier naming scheme;
   - ``<folder>/<r>.jpg`` or ``<folder>/<r>`` (other scripts),

   where ``<folder>`` is the first that exists of ``training/`` (``validation/`` for the
   validation split) and ``images/``. The image type is read from the file's bytes, never from
   its name. The downloader's ``downloaded_*_report.tsv(.gz)`` is not needed and is ignored.
   Rows whose image was never downloaded, or whose file is not a readable image (a truncated
   download, an HTML error page saved in its place), are skipped and counted like any
   unreadable image.
3. **img2dataset folders** — ``--output_format files``: numbered subfolders ``00000/``,
   ``00001/``, ... holding ``000000001.jpg`` with its caption in ``000000001.txt`` (and a
   ``.json`` that is ignored). Items are ordered by folder, then key.

For layouts 1 and 3 the root holds one split (img2dataset writes one output folder per input
file), so point ``--data-root`` at the folder of the split you want; ``split`` only picks the TSV.
"""

from __future__ import annotations

import array
import logging
import os
import zlib
from pathlib import Path

from PIL import Image

from aptp.data.common import (
    IMAGE_EXTENSIONS,
    CaptionDataset,
    ImageTransform,
    canonical_split,
    clean_caption,
    decode_image,
)
from aptp.data.shards import SHARD_PATTERN, WebDatasetShards, find_shards
from aptp.errors import DataError

logger = logging.getLogger(__name__)

TSV_FILES: dict[str, str] = {"train": "Train_GCC-training.tsv",
                             "validation": "Validation_GCC-1.1.0-Validation.tsv"}
# Image folders of the TSV layout per split, in the order they are looked for.
TSV_IMAGE_FOLDERS: dict[str, tuple[str, ...]] = {"train": ("training", "images"),
                                                 "validation": ("validation", "images")}


def open_cc3m(root: str | Path, transform: ImageTransform, split: str = "train",
              max_samples: int | None = None) -> CaptionDataset:
    """Opens a CC3M root in whichever layout it holds (see the module docstring for the order).

    Args:
        root: The CC3M folder (``--data-root``).
        transform: Image transform.
        split: ``"train"`` or ``"validation"``; picks the TSV file of layout 2.
        max_samples: Keep only the first this many items; None for all.

    Raises:
        DataError: The root is missing, matches no layout, or holds no captioned item.
    """
    root = Path(root).expanduser()
    split = canonical_split(split)
    if not root.is_dir():
        raise DataError(f"CC3M root {root} is not a folder; pass the folder with the CC3M TSV or "
                        "shards as --data-root")
    if find_shards(root):
        return WebDatasetShards(root, transform, max_samples=max_samples, kind="cc3m-shards")
    if (root / TSV_FILES[split]).is_file():
        return CC3MTsv(root, transform, split=split, max_samples=max_samples)
    if _numbered_folders(root):
        return Img2DatasetFolder(root, transform, max_samples=max_samples)
    raise DataError(
        f"CC3M root {root} holds none of the accepted layouts: {SHARD_PATTERN} shards, "
        f"{TSV_FILES[split]} with its image folder, or img2dataset folders 00000/; "
        "pass the right folder as --data-root"
    )


class CC3MTsv(CaptionDataset):
    """The official CC3M TSV with a folder of downloaded images (layout 2 of the module docstring).

    Args:
        root: Folder holding the TSV and the image folder.
        transform: Image transform.
        split: ``"train"`` or ``"validation"``.
        max_samples: Keep only the first this many captioned rows; None for all.

    Raises:
        DataError: Missing TSV or image folder, or no captioned row.
    """

    kind = "cc3m-tsv"

    def __init__(self, root: str | Path, transform: ImageTransform, split: str = "train",
                 max_samples: int | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        self.split = canonical_split(split)
        self.tsv_path = self.root / TSV_FILES[self.split]
        if not self.tsv_path.is_file():
            raise DataError(f"CC3M root {self.root} has no {TSV_FILES[self.split]}; pass the folder "
                            "that holds it as --data-root")
        self._rows = array.array("q")  # 0-based line number of each item, as downloaders name files
        self._crcs = array.array("q")  # unsigned CRC-32 of each item's URL (-1: no URL)
        self._paths: list[str] | None = None  # third column, when the TSV has one
        paths: list[str] = []
        with open(self.tsv_path, encoding="utf-8", errors="replace") as handle:
            for row, line in enumerate(handle):
                if max_samples is not None and len(self._captions) >= max_samples:
                    break
                # Plain split, not the csv module: captions contain quotes that are not quoting.
                fields = line.rstrip("\r\n").split("\t")
                caption = clean_caption(fields[0])
                if not caption:
                    continue
                self._captions.append(caption)
                self._rows.append(row)
                url = fields[1] if len(fields) > 1 else ""  # as the TSV holds it: the downloader hashes that
                self._crcs.append(zlib.crc32(url.encode("utf-8")) if url.strip() else -1)
                paths.append(fields[2].strip() if len(fields) > 2 else "")
        if not self._captions:
            raise DataError(f"{self.tsv_path} has no captioned row (expected caption<TAB>url lines)")
        if all(paths):
            self._paths = paths
            self.image_dir = self.root
        else:
            if any(paths):
                logger.warning("%s: only some rows have an image path column; looking in the image folder for all",
                               self.tsv_path)
            folders = TSV_IMAGE_FOLDERS[self.split]
            found = next((self.root / f for f in folders if (self.root / f).is_dir()), None)
            if found is None:
                raise DataError(f"CC3M root {self.root} has {TSV_FILES[self.split]} but no image folder "
                                f"({' or '.join(f + '/' for f in folders)}); download the images first")
            self.image_dir = found

    def candidate_names(self, index: int) -> list[str]:
        """File names (in :attr:`image_dir`) that may hold item ``index``'s image, in the order tried."""
        row, crc = self._rows[index], self._crcs[index]
        names = [f"{row}_{crc}", str(crc)] if crc >= 0 else []
        return names + [f"{row}.jpg", str(row)]

    def image_path(self, index: int) -> Path:
        """The file expected to hold item ``index``'s image (it may not exist)."""
        if self._paths is not None:
            return self.root / self._paths[index]
        names = self.candidate_names(index)
        found = next((self.image_dir / n for n in names if (self.image_dir / n).is_file()), None)
        # When nothing was downloaded, name the downloader's file: that is what is missing.
        return found if found is not None else self.image_dir / names[0]

    def describe(self, index: int) -> str:
        return f"row {self._rows[index]} ({self.image_path(index)})"

    def _open_image(self, index: int) -> Image.Image:
        return decode_image(self.image_path(index), self.transform.resolution)


def _numbered_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())


class Img2DatasetFolder(CaptionDataset):
    """img2dataset ``files`` output: ``00000/000000001.jpg`` + ``.txt`` (layout 3).

    Every ``KEY.txt`` with a non-empty caption is an item; its image is the first of
    ``KEY.jpg``, ``.jpeg``, ``.png``, ``.webp``, ``.bmp`` in the same folder (missing → skipped).

    Args:
        root: Folder holding the numbered subfolders.
        transform: Image transform.
        max_samples: Keep only the first this many items; None for all.

    Raises:
        DataError: No numbered subfolder, or no caption file in any.
    """

    kind = "cc3m-folders"

    def __init__(self, root: str | Path, transform: ImageTransform, max_samples: int | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root).expanduser()
        folders = _numbered_folders(self.root) if self.root.is_dir() else []
        if not folders:
            raise DataError(f"{self.root} has no numbered img2dataset folders (00000/, ...)")
        # Image path relative to root; KEY.jpg when no image exists, so that it is skipped as missing.
        self._images: list[str] = []
        for folder in folders:
            if max_samples is not None and len(self._captions) >= max_samples:
                break
            names = {entry.name for entry in os.scandir(folder) if entry.is_file()}
            for name in sorted(n for n in names if n.endswith(".txt")):
                if max_samples is not None and len(self._captions) >= max_samples:
                    break
                caption = clean_caption((folder / name).read_text(encoding="utf-8", errors="replace"))
                if not caption:
                    continue
                stem = name[: -len(".txt")]
                image = next((stem + e for e in IMAGE_EXTENSIONS if stem + e in names), "")
                self._captions.append(caption)
                self._images.append(f"{folder.name}/{image}" if image else f"{folder.name}/{stem}.jpg")
        if not self._captions:
            raise DataError(f"the img2dataset folders in {self.root} hold no caption (.txt) file")

    def describe(self, index: int) -> str:
        return str(self.root / self._images[index])

    def _open_image(self, index: int) -> Image.Image:
        return decode_image(self.root / self._images[index], self.transform.resolution)
