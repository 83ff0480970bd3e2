"""Per-image evaluation features on disk: what ``aptp eval --save-embeddings`` writes and what
``aptp eval`` reads back as a target, so a model is scored again — and paired with new ones —
without its images.

One safetensors file per target holds, for the captions it was scored on, the tensors of
:func:`aptp.metrics.embed_images` in float64 (the CLIP image embeddings, the FID features unless
they are the CLIP ones, the CLIP scores, the PickScores: whatever the eval computed), and in its
metadata the captions themselves, the feature networks' ids, the eval resolution, and the
target's MACs ratio, guidance and seconds per image. Scores computed from such a file equal those
computed from the images (same real statistics, same bootstrap draws): the file is the images as
the metrics see them, about 1 KB per image and 128-d feature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aptp.errors import AptpUserError

FORMAT = "aptp-eval-embeddings/1"
KEYS = ("clip_image", "fid_image", "clip", "pickscore")
FID_IS_CLIP = "clip_image"  # metadata value of "fid_image" when the FID features are the CLIP embeddings


@dataclass
class StoredEmbeddings:
    """An embeddings file as read: ``tensors`` keyed as :func:`aptp.metrics.embed_images` keys them."""

    path: Path
    captions: list[str]
    tensors: dict[str, torch.Tensor]
    target: str
    kind: str
    resolution: int | str
    feature_ids: dict[str, str] = field(default_factory=dict)  # "clip_image" / "fid_image" -> feature id
    info: dict[str, Any] = field(default_factory=dict)  # macs_ratio, seconds_per_image, guidance

    def select(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The tensors for ``captions``, which must be the file's first ``len(captions)``.

        Raises:
            AptpUserError: If they are not (other captions, another order, or more of them).
        """
        n = len(captions)
        if n > len(self.captions):
            raise AptpUserError(f"{self.path}: holds {len(self.captions)} images, the evaluation asks {n}; "
                                "lower --limit or save the embeddings of a larger evaluation")
        if self.captions[:n] != captions:
            i = next(i for i, (a, b) in enumerate(zip(self.captions, captions)) if a != b)
            raise AptpUserError(f"{self.path}: scored on other captions (caption {i}: {self.captions[i]!r}, "
                                f"the evaluation's: {captions[i]!r}); evaluate with the data set and split it was saved with")
        return {k: v[:n] for k, v in self.tensors.items()}

    def check_features(self, needed: dict[str, str], resolution: int | str) -> None:
        """One line if the file was computed at another resolution or with another feature network
        than ``needed`` ({"clip_image" | "fid_image": feature id} the evaluation uses), or lacks one.

        Raises:
            AptpUserError: On any mismatch.
        """
        if str(self.resolution) != str(resolution):
            raise AptpUserError(f"{self.path}: images scored at {self.resolution}px, the evaluation uses "
                                f"{resolution}px (eval.resolution)")
        for key, fid in needed.items():
            have = self.feature_ids.get(key)
            if have is None or key not in self.tensors:
                raise AptpUserError(f"{self.path}: has no {key} features; save it with the metrics you evaluate now")
            if have != fid:
                raise AptpUserError(f"{self.path}: {key} features from {have}, the evaluation uses {fid}; "
                                    "evaluate with the feature network it was saved with")


def save_embeddings(path: str | Path, kept: dict[str, torch.Tensor], captions: list[str], *, target: str,
                    kind: str, resolution: int | str, feature_ids: dict[str, str], info: dict[str, Any]) -> Path:
    """Write one target's per-image tensors (``kept`` of :func:`aptp.metrics.embed_images`)
    atomically to ``path``. FID features that are the CLIP embeddings are stored once."""
    from safetensors.torch import save_file

    from aptp.io import atomic_path

    n = len(captions)
    tensors, meta = {}, {"format": FORMAT, "target": target, "kind": kind, "resolution": str(resolution),
                         "captions": json.dumps(captions), "info": json.dumps(info)}
    for key in KEYS:
        if key not in kept:
            continue
        t = kept[key]
        if len(t) != n:
            raise ValueError(f"{key}: {len(t)} rows for {n} captions")
        if key == "fid_image" and "clip_image" in kept and t is kept["clip_image"]:
            meta["fid_image"] = FID_IS_CLIP
        else:
            tensors[key] = t.detach().to(torch.float64).cpu().contiguous()
        if key in feature_ids:
            meta[f"{key}_features"] = feature_ids[key]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def is_embeddings_file(path: Path) -> bool:
    return path.is_file() and path.suffix == ".safetensors"


def load_embeddings(path: str | Path) -> StoredEmbeddings:
    """Read a file of :func:`save_embeddings`.

    Raises:
        AptpUserError: If it is not one (another safetensors file, a damaged one, another format).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise AptpUserError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise AptpUserError(f"{path}: not an `aptp eval --save-embeddings` file (format {meta.get('format')!r}, "
                            f"expected {FORMAT!r})")
    try:
        captions = json.loads(meta["captions"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise AptpUserError(f"{path}: damaged metadata ({exc})") from None
    if meta.get("fid_image") == FID_IS_CLIP and "clip_image" in tensors:
        tensors["fid_image"] = tensors["clip_image"]
    bad = [k for k, t in tensors.items() if len(t) != len(captions)]
    if bad:
        raise AptpUserError(f"{path}: {bad} do not hold one row per caption ({len(captions)})")
    feature_ids = {k: meta[f"{k}_features"] for k in KEYS if f"{k}_features" in meta}
    return StoredEmbeddings(path, captions, tensors, meta.get("target", path.stem), meta.get("kind", "?"),
                            meta.get("resolution", "?"), feature_ids, info)
