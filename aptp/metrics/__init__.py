"""Image metrics of the paper's evaluation (App. E.3): FID, CLIP score, CMMD, and PickScore.

Protocol (the paper's): images are generated at the model's resolution, then resized to 256 px
with PIL bicubic before every metric (:func:`resize_for_eval`); each feature network then applies
its own preprocessing. Real-image statistics are cached per (data set, resolution, feature
network) so several models are compared against the same reference without re-embedding it.

Typical use::

    clip = ClipFeatures.from_open_clip("ViT-B-32")          # CLIP score + CMMD space
    fidnet = load_fid_features("domain-clip")                # or None for Inception
    compute_metrics(images, captions, real_images, ["fid", "clip", "cmmd"], clip,
                    fid_features=fidnet, real_stats_key="shapes-val-n500")
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from aptp.metrics.clip_score import clip_score, clip_scores, clip_scores_from_features
from aptp.metrics.cmmd import CMMD_SCALE, CMMD_SIGMA, DEFAULT_ESTIMATOR, cmmd, cmmd_images, mmd2
from aptp.metrics.features import (
    ClipFeatures,
    FeatureNet,
    ImageFeatureExtractor,
    InceptionFeatures,
    inception_available,
    load_fid_features,
)
from aptp.metrics.fid import (
    GaussianStats,
    StatsCache,
    default_cache_dir,
    fid_torchmetrics,
    frechet_distance,
    real_statistics,
)
from aptp.metrics.pickscore import PickScore

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

__all__ = [
    "CMMD_SCALE",
    "CMMD_SIGMA",
    "DEFAULT_ESTIMATOR",
    "EVAL_RESOLUTION",
    "METRICS",
    "ClipFeatures",
    "FeatureNet",
    "GaussianStats",
    "ImageFeatureExtractor",
    "InceptionFeatures",
    "PickScore",
    "StatsCache",
    "clip_score",
    "clip_scores",
    "clip_scores_from_features",
    "cmmd",
    "cmmd_images",
    "compute_metrics",
    "default_cache_dir",
    "embed_images",
    "fid_torchmetrics",
    "frechet_distance",
    "inception_available",
    "load_fid_features",
    "mmd2",
    "real_statistics",
    "resize_for_eval",
    "score_embeddings",
]

EVAL_RESOLUTION = 256  # the paper scores 768 px samples at 256 px
METRICS = ("fid", "clip", "cmmd", "pickscore")


def resize_for_eval(image: Image.Image, resolution: int = EVAL_RESOLUTION) -> Image.Image:
    """RGB ``resolution`` x ``resolution`` with PIL bicubic.

    Square images are resized directly; others have their shorter side resized to
    ``resolution`` and are centre-cropped (real photographs, e.g. COCO), never stretched.
    """
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    if w == h:
        return image if w == resolution else image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _check_metrics(metrics: Sequence[str]) -> list[str]:
    wanted = list(dict.fromkeys(metrics))
    unknown = [m for m in wanted if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    return wanted


def embed_images(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    metrics: Sequence[str],
    features: ClipFeatures | None,
    fid_features: ImageFeatureExtractor | None = None,
    resolution: int | None = EVAL_RESOLUTION,
    pickscore: PickScore | None = None,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """What the metrics are computed from, per image: ``"clip_image"`` (N, d) CLIP embeddings
    (for the CLIP score and CMMD, and FD when the FID network is CLIP), ``"clip"`` (N,) CLIP
    scores, ``"fid_image"`` (N, d') FID features, ``"pickscore"`` (N,) PickScores: the entries of
    the metrics asked. :func:`score_embeddings` turns them into the metrics; the two together
    are :func:`compute_metrics`. Arguments as there.
    """
    wanted = _check_metrics(metrics)
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    if features is None and ({"clip", "cmmd"} & set(wanted) or ("fid" in wanted and fid_features is None)):
        raise ValueError(f"metrics {wanted} need a CLIP feature extractor (features=ClipFeatures...)")
    if "pickscore" in wanted and pickscore is None:
        raise ValueError("metric 'pickscore' needs a loaded PickScore (PickScore.from_pretrained(folder))")
    fake = [resize_for_eval(im, resolution) if resolution else im.convert("RGB") for im in images]
    fidnet = fid_features if fid_features is not None else features
    kept: dict[str, torch.Tensor] = {}
    if {"clip", "cmmd"} & set(wanted) or ("fid" in wanted and fidnet is features):
        kept["clip_image"] = features.image_features(fake, batch_size)  # (N, d)
    if "fid" in wanted:
        kept["fid_image"] = kept["clip_image"] if fidnet is features else fidnet.image_features(fake, batch_size)
    if "clip" in wanted:
        kept["clip"] = clip_scores_from_features(kept["clip_image"], features.text_features(captions))
    if "pickscore" in wanted:
        kept["pickscore"] = pickscore.scores(fake, captions, batch_size=min(batch_size, 32))
    return kept


def score_embeddings(
    kept: dict[str, torch.Tensor],
    real_images: Sequence[Image.Image] | Callable[[], Sequence[Image.Image]] | None,
    metrics: Sequence[str],
    features: ClipFeatures | None,
    fid_features: ImageFeatureExtractor | None = None,
    real_stats_key: str | None = None,
    resolution: int | None = EVAL_RESOLUTION,
    cache: StatsCache | str | Path | None = None,
    batch_size: int = 64,
    cmmd_estimator: Literal["biased", "unbiased"] = DEFAULT_ESTIMATOR,
) -> dict[str, float | int | str]:
    """The metrics from what :func:`embed_images` kept (or an ``aptp eval --save-embeddings``
    file holds) against the real reference set. Arguments and result as :func:`compute_metrics`.

    Raises:
        ValueError: If ``kept`` lacks what a metric asked needs.
    """
    wanted = _check_metrics(metrics)
    needs = {"fid": "fid_image", "clip": "clip", "cmmd": "clip_image", "pickscore": "pickscore"}
    lacking = [m for m in wanted if needs[m] not in kept]
    if lacking:
        raise ValueError(f"metrics {lacking} need per-image {[needs[m] for m in lacking]}, which were not kept")
    store = cache if isinstance(cache, StatsCache) else StatsCache(cache)
    real_loader = None
    if real_images is not None:
        loaded: list[list[Image.Image]] = []

        def real_loader() -> list[Image.Image]:
            if not loaded:
                imgs = real_images() if callable(real_images) else real_images
                loaded.append([resize_for_eval(im, resolution) if resolution else im.convert("RGB") for im in imgs])
            return loaded[0]
    dataset_id = f"{real_stats_key}@{resolution or 'native'}px" if real_stats_key is not None else None
    fidnet = fid_features if fid_features is not None else features
    n = len(next(iter(kept.values())))
    out: dict[str, float | int | str] = {"n_images": n, "resolution": resolution or "native"}
    if "clip_image" in kept and features is not None:
        out["clip_features"] = features.feature_id
    clip_real: GaussianStats | None = None
    if "cmmd" in wanted:
        clip_real = real_statistics(dataset_id, features, real_loader, store, keep_features=True, batch_size=batch_size)
    if "fid" in wanted:
        if fidnet is features and clip_real is not None:
            real_stats = clip_real
        else:
            real_stats = real_statistics(dataset_id, fidnet, real_loader, store, batch_size=batch_size)
        out["fid"] = frechet_distance(real_stats, kept["fid_image"])
        out["fid_features"] = fidnet.feature_id
    if "clip" in wanted:
        out["clip"] = float(kept["clip"].mean())
    if "cmmd" in wanted:
        out["cmmd"] = cmmd(clip_real.features, kept["clip_image"], estimator=cmmd_estimator)
    if "pickscore" in wanted:
        out["pickscore"] = float(kept["pickscore"].mean())
    return out


def compute_metrics(
    images: Sequence[Image.Image],
    captions: Sequence[str],
    real_images: Sequence[Image.Image] | Callable[[], Sequence[Image.Image]] | None,
    metrics: Sequence[str],
    features: ClipFeatures | None,
    fid_features: ImageFeatureExtractor | None = None,
    real_stats_key: str | None = None,
    resolution: int | None = EVAL_RESOLUTION,
    pickscore: PickScore | None = None,
    cache: StatsCache | str | Path | None = None,
    batch_size: int = 64,
    cmmd_estimator: Literal["biased", "unbiased"] = DEFAULT_ESTIMATOR,
    keep: dict[str, torch.Tensor] | None = None,
) -> dict[str, float | int | str]:
    """Score generated images against their captions and a real reference set
    (:func:`embed_images`, then :func:`score_embeddings`).

    Args:
        images: Generated images, one per caption.
        captions: The prompts they were generated from.
        real_images: Reference images for FID and CMMD, or a function that loads them (called
            only on a cache miss, at most once); may be None when their statistics are cached
            under ``real_stats_key``.
        metrics: Any of ``"fid"``, ``"clip"``, ``"cmmd"``, ``"pickscore"``.
        features: CLIP network for the CLIP score and the CMMD embeddings (needed for both).
        fid_features: FID network; None uses ``features`` (an FD in CLIP space).
        real_stats_key: Identifies the real set (e.g. ``"shapes-val-n500-seed0"``); the resolution
            and the feature network id are appended to form the cache key. None disables caching.
        resolution: Every image is resized to this square size first (PIL bicubic); None keeps
            the images as they are.
        pickscore: A loaded :class:`PickScore`, for ``"pickscore"``.
        cache: A :class:`StatsCache` or its folder; None for :func:`default_cache_dir`.
        batch_size: Images per forward pass.
        cmmd_estimator: ``"biased"`` (reference CMMD) or ``"unbiased"``; see :mod:`aptp.metrics.cmmd`.
        keep: A dict that receives what was computed per image (:func:`embed_images`), for
            callers that need it too (bootstrap intervals, saved embeddings).

    Returns:
        ``{"n_images": N, "resolution": ..., "fid": ..., "fid_features": <feature id>,
        "clip": ..., "cmmd": ..., "clip_features": <feature id>, "pickscore": ...}`` for the
        metrics asked (FID/FD lower is better, CLIP score and PickScore higher, CMMD lower).

    Raises:
        ValueError: For unknown metric names, mismatched counts or a missing network.
        DataError: If FID/CMMD need real images that are neither given nor cached.
    """
    kept = embed_images(images, captions, metrics, features, fid_features, resolution, pickscore, batch_size)
    out = score_embeddings(kept, real_images, metrics, features, fid_features, real_stats_key, resolution,
                           cache, batch_size, cmmd_estimator)
    if keep is not None:
        keep.update(kept)
    return out
