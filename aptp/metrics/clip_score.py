"""CLIP score (Hessel et al. 2021): how well each image matches its caption.

``CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0)`` averaged over (image, caption) pairs, the
definition torchmetrics' ``CLIPScore`` implements (its weight ``w = 100``). We compute it with our
own :class:`~aptp.metrics.features.ClipFeatures` because torchmetrics' class breaks with
transformers 5 (DESIGN.md §3) and because the paper's evaluation used open_clip ViT-B/32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

    from aptp.metrics.features import ClipFeatures

__all__ = ["clip_score", "clip_scores", "clip_scores_from_features"]


def clip_scores_from_features(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP scores from embeddings (normalised here, so raw embeddings work too).

    Args:
        image_features: ``(N, d)``.
        text_features: ``(N, d)``; row ``i`` is the caption of image ``i``.

    Returns:
        ``(N,)`` float64, ``100 * max(cos, 0)``.

    Raises:
        ValueError: If the shapes differ.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"need (N, d) image and text features of one shape, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    img = torch.nn.functional.normalize(image_features.to(torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(text_features.to(torch.float64), dim=-1)
    return 100 * (img * txt).sum(dim=-1).clamp(min=0)  # (N,)


def clip_scores(images: Sequence[Image.Image], captions: Sequence[str], features: ClipFeatures,
                batch_size: int = 64) -> torch.Tensor:
    """Per-pair CLIP scores ``(N,)`` of images and their captions.

    Raises:
        ValueError: If the counts differ or are zero.
    """
    if len(images) != len(captions) or not images:
        raise ValueError(f"need one caption per image, got {len(images)} images and {len(captions)} captions")
    return clip_scores_from_features(features.image_features(images, batch_size), features.text_features(captions))


def clip_score(images: Sequence[Image.Image], captions: Sequence[str], features: ClipFeatures,
               batch_size: int = 64) -> float:
    """Mean CLIP score over (image, caption) pairs, in [0, 100]."""
    return float(clip_scores(images, captions, features, batch_size).mean())
