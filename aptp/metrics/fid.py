"""Fréchet distance between feature Gaussians (FID), with cached real statistics.

FID (Heusel et al. 2017) fits a Gaussian to the features of each image set and measures

    FD = ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))

We compute it in float64 from ``(mean, covariance)`` so that the real side can come from a cache:
``Tr((S_r S_g)^(1/2))`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix
``S_r^(1/2) S_g S_r^(1/2)`` (it has the eigenvalues of ``S_r S_g``), so two symmetric
eigendecompositions replace scipy's ``sqrtm``. Covariances use the ``N - 1`` normaliser like
torchmetrics' ``FrechetInceptionDistance``, which :func:`fid_torchmetrics` runs on the same
feature network as a cross-check (tests assert both agree).

Real statistics are cached per (data set id, feature network id) in
``$XDG_CACHE_HOME/aptp/fid-stats/<key>.safetensors`` (default ``~/.cache/aptp/fid-stats``):
``mean``, ``cov``, ``count`` and optionally the features themselves (CMMD needs them), written
atomically. The feature id includes a hash of the network's weights, so a retrained network never
reuses stale statistics.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aptp.errors import DataError
from aptp.io import atomic_save_file

if TYPE_CHECKING:
    from PIL import Image

    from aptp.metrics.features import ImageFeatureExtractor

logger = logging.getLogger(__name__)

__all__ = [
    "FrechetReference",
    "GaussianStats",
    "StatsCache",
    "default_cache_dir",
    "fid_torchmetrics",
    "frechet_distance",
    "real_statistics",
]

_FORMAT = "aptp-fid-stats/1"


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set (float64).

    Attributes:
        mean: ``(d,)``.
        cov: ``(d, d)``, normalised by ``count - 1``.
        count: Number of feature vectors.
        features: The ``(N, d)`` features themselves when kept (CMMD needs them), else None.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    count: int
    features: torch.Tensor | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor, keep_features: bool = False) -> GaussianStats:
        """Fit ``(mean, cov)`` to ``(N, d)`` features, ``N >= 2``.

        Raises:
            ValueError: For fewer than 2 rows or a non-2-D input.
        """
        x = features.detach().to(torch.float64).cpu()
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, d), got {tuple(x.shape)}")
        mean = x.mean(dim=0)  # (d,)
        xc = x - mean  # (N, d)
        cov = xc.T @ xc / (x.shape[0] - 1)  # (d, d)
        return cls(mean, cov, int(x.shape[0]), x.clone() if keep_features else None)

    @property
    def dim(self) -> int:
        """Feature width ``d``."""
        return int(self.mean.shape[0])


def _as_stats(x: torch.Tensor | GaussianStats) -> GaussianStats:
    return x if isinstance(x, GaussianStats) else GaussianStats.from_features(x)


def _sym_sqrt(m: torch.Tensor) -> torch.Tensor:
    # Square root of a symmetric PSD matrix; round-off makes tiny eigenvalues negative, clamp them.
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(real: torch.Tensor | GaussianStats, fake: torch.Tensor | GaussianStats) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets, in float64.

    Args:
        real: ``(N, d)`` features or their :class:`GaussianStats` (e.g. from the cache).
        fake: ``(M, d)`` features or their :class:`GaussianStats`.

    Returns:
        ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))``, clamped at 0.

    Raises:
        ValueError: If the widths differ or a set has fewer than 2 vectors.
    """
    a, b = _as_stats(real), _as_stats(fake)
    if a.dim != b.dim:
        raise ValueError(f"feature widths differ: {a.dim} vs {b.dim}")
    return FrechetReference(a).distance_to_stats(b)


class FrechetReference:
    """The real side of :func:`frechet_distance`, factored once for many generated sets.

    Its mean, covariance trace and covariance square root ``S_r^(1/2)`` are computed here; each
    :meth:`distance` then needs one symmetric eigenvalue problem of size ``min(N, d)``: with
    ``A = (X - mean) S_r^(1/2) / sqrt(N - 1)`` for the ``(N, d)`` generated features ``X``,
    ``S_r^(1/2) S_g S_r^(1/2) = A^T A``, whose non-zero eigenvalues are those of ``A A^T``. The
    bootstrap of ``aptp eval`` recomputes FD on a hundred resampled sets per target, where this
    replaces two ``d x d`` decompositions per set.
    """

    def __init__(self, real: torch.Tensor | GaussianStats):
        a = _as_stats(real)
        self.mean = a.mean.to(torch.float64)
        cov = a.cov.to(torch.float64)
        self.trace = cov.trace()
        self.root = _sym_sqrt(cov)
        self.dim = a.dim

    def distance_to_stats(self, fake: GaussianStats) -> float:
        """FD against a generated set's ``(mean, cov)``: the ``d x d`` route of :func:`frechet_distance`."""
        s2 = fake.cov.to(torch.float64)
        inner = self.root @ s2 @ self.root  # (d, d) symmetric PSD, same eigenvalues as S1 S2
        tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
        diff = self.mean - fake.mean.to(torch.float64)
        # FD >= 0; identical sets give round-off of either sign, report those as 0.
        return max(float(diff @ diff + self.trace + s2.trace() - 2 * tr_sqrt), 0.0)

    def distance(self, fake_features: torch.Tensor) -> float:
        """FD of the real statistics against the ``(N, d)`` generated features, ``N >= 2``."""
        x = fake_features.detach().to(torch.float64).cpu()
        if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] != self.dim:
            raise ValueError(f"need (N >= 2, {self.dim}) features, got {tuple(x.shape)}")
        n = x.shape[0]
        mean = x.mean(dim=0)
        xc = x - mean
        a = (xc @ self.root) / math.sqrt(n - 1)  # (N, d)
        gram = a @ a.T if n < self.dim else a.T @ a
        tr_sqrt = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp(min=0).sqrt().sum()
        diff = self.mean - mean
        return max(float(diff @ diff + self.trace + (xc * xc).sum() / (n - 1) - 2 * tr_sqrt), 0.0)


def fid_torchmetrics(real: torch.Tensor | Sequence[Image.Image], fake: torch.Tensor | Sequence[Image.Image],
                     extractor: ImageFeatureExtractor, batch_size: int = 64) -> float:
    """FID by torchmetrics' ``FrechetInceptionDistance`` with ``extractor`` as its network.

    The reference path (no caching); :func:`frechet_distance` on the extractor's features gives
    the same number.

    Args:
        real: uint8 ``(N, 3, H, W)`` images or PIL images (one size).
        fake: Same for the generated set.
        extractor: Feature network, wrapped in :class:`~aptp.metrics.features.FeatureNet`.
        batch_size: Images per ``update`` call.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from aptp.metrics.features import FeatureNet, images_to_uint8

    metric = FrechetInceptionDistance(feature=FeatureNet(extractor, batch_size), normalize=False)
    for imgs, is_real in ((real, True), (fake, False)):
        x = imgs if isinstance(imgs, torch.Tensor) else images_to_uint8(imgs)  # (N, 3, H, W) uint8
        for i in range(0, x.shape[0], batch_size):
            metric.update(x[i:i + batch_size], real=is_real)
    return float(metric.compute())


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/aptp/fid-stats`` (``~/.cache/aptp/fid-stats`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "aptp" / "fid-stats"


def _slug(text: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")[:limit] or "x"


class StatsCache:
    """Real-image statistics on disk, one safetensors file per (data set, feature network).

    Args:
        cache_dir: Folder of the files; None for :func:`default_cache_dir`.
    """

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def path(self, dataset_id: str, feature_id: str) -> Path:
        """``<dataset slug>--<feature slug>-<hash of both>.safetensors``: readable and unique."""
        digest = hashlib.sha256(f"{dataset_id}\0{feature_id}".encode()).hexdigest()[:12]
        return self.cache_dir / f"{_slug(dataset_id)}--{_slug(feature_id)}-{digest}.safetensors"

    def load(self, dataset_id: str, feature_id: str) -> GaussianStats | None:
        """The cached statistics, or None if absent or unreadable (logged, then recomputed)."""
        from safetensors import safe_open

        path = self.path(dataset_id, feature_id)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                if (meta.get("format"), meta.get("dataset_id"), meta.get("feature_id")) != (_FORMAT, dataset_id, feature_id):
                    logger.warning("ignoring %s: written for another key or format (%s)", path, meta)
                    return None
                keys = set(fh.keys())
                feats = fh.get_tensor("features") if "features" in keys else None
                return GaussianStats(fh.get_tensor("mean"), fh.get_tensor("cov"),
                                     int(fh.get_tensor("count").item()), feats)
        except Exception as exc:  # a truncated or foreign file: recompute rather than fail
            logger.warning("ignoring unreadable statistics file %s: %s", path, exc)
            return None

    def save(self, dataset_id: str, feature_id: str, stats: GaussianStats) -> Path:
        """Write ``stats`` atomically (features included when present)."""
        tensors = {
            "mean": stats.mean.to(torch.float64).contiguous(),
            "cov": stats.cov.to(torch.float64).contiguous(),
            "count": torch.tensor([stats.count], dtype=torch.int64),
        }
        if stats.features is not None:
            tensors["features"] = stats.features.to(torch.float64).contiguous()
        meta = {"format": _FORMAT, "dataset_id": dataset_id, "feature_id": feature_id, "count": str(stats.count)}
        return atomic_save_file(tensors, self.path(dataset_id, feature_id), metadata=meta)


def real_statistics(
    dataset_id: str | None,
    extractor: ImageFeatureExtractor,
    images: Sequence[Image.Image] | Callable[[], Sequence[Image.Image]] | None,
    cache: StatsCache | None = None,
    keep_features: bool = False,
    batch_size: int = 64,
) -> GaussianStats:
    """Statistics of the real images under ``extractor``, from the cache when possible.

    Args:
        dataset_id: Identifies the exact real image set *and* its preprocessing (e.g.
            ``"shapes-val-n500@256px"``); None disables caching.
        extractor: The feature network; its ``feature_id`` is the other half of the key.
        images: The real images, or a function returning them (called only on a cache miss).
        cache: Where to look and write; None for the default folder.
        keep_features: Also keep (and cache) the features themselves, as CMMD needs.
        batch_size: Images per forward pass.

    Raises:
        DataError: On a cache miss without images.
    """
    cache = cache if cache is not None else StatsCache()
    if dataset_id is not None:
        hit = cache.load(dataset_id, extractor.feature_id)
        if hit is not None and (hit.features is not None or not keep_features):
            logger.info("real statistics from %s", cache.path(dataset_id, extractor.feature_id))
            return hit
    if images is None:
        where = cache.path(dataset_id, extractor.feature_id) if dataset_id is not None else "(caching off)"
        raise DataError(f"no cached real statistics at {where} and no real images given; pass the real images once")
    imgs = images() if callable(images) else images
    stats = GaussianStats.from_features(extractor.image_features(imgs, batch_size=batch_size), keep_features)
    if dataset_id is not None:
        cache.save(dataset_id, extractor.feature_id, stats)
    return stats
