"""Bootstrap intervals over prompts for ``aptp eval``: per target and paired between targets.

Every target is evaluated on the same prompts with the same seeds (prompt *i* gets seed
``generate.seed + i``), so one draw of prompt indices (with replacement) is applied to *every*
target. A target's bootstrap distribution is its statistic recomputed on each draw; the paired
difference against a reference is the draw-by-draw difference of two such distributions, so the
prompt-to-prompt variation both targets share cancels (Efron & Tibshirani 1993, ch. 6 and 13).

Statistics:

* per-image scores (CLIP score, PickScore): the mean of the resampled scores;
* FD: :func:`~aptp.metrics.fid.frechet_distance` of the resampled generated feature rows against
  the fixed real statistics;
* CMMD: :func:`~aptp.metrics.cmmd.cmmd` of the fixed real features against the resampled
  generated ones.

The real side is held fixed: the intervals describe the variation due to the prompts (and their
seeds) of the generated set. Intervals are percentile intervals. A resample of images repeats
some of them (a draw holds about 63% distinct images), and FD and CMMD treat the repeats as
agreement: their resampled values sit above the full set's by the resampling bias, which in a
512-d feature space at N = 500 is larger than their whole spread (a teacher's FD 0.0175 had the
percentile interval [0.0242, 0.0333]). For those statistics (``centre=True``) the distribution is
shifted by its bootstrap bias estimate ``mean(draws) - value`` before the quantiles are read
(Efron & Tibshirani 1993, ch. 10), so the interval is the spread of the N-image estimate around the
value actually measured; the shift is reported as ``bootstrap_bias``. Paired differences are
shifted the same way; there the two targets' biases mostly cancel and the shift is small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from aptp.metrics.cmmd import CMMD_SCALE, CMMD_SIGMA, DEFAULT_ESTIMATOR, cmmd
from aptp.metrics.fid import FrechetReference, GaussianStats

__all__ = [
    "LEVEL",
    "bootstrap_distribution",
    "cmmd_statistic",
    "fd_statistic",
    "mean_statistic",
    "paired_summary",
    "percentile_interval",
    "resample_indices",
    "summary",
]

LEVEL = 0.95

Statistic = Callable[[torch.Tensor], float]  # (N,) prompt indices -> the statistic on those prompts


def resample_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, n)`` int64 prompt indices drawn with replacement, deterministic in ``seed``.

    Raises:
        ValueError: If ``n < 1`` or ``resamples < 1``.
    """
    if n < 1 or resamples < 1:
        raise ValueError(f"need n >= 1 and resamples >= 1, got n={n} and resamples={resamples}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, n, (resamples, n), generator=gen)


def mean_statistic(values: torch.Tensor) -> Statistic:
    """The mean of per-prompt ``values`` ``(N,)`` over the given indices."""
    v = values.detach().to(torch.float64).cpu().reshape(-1)
    return lambda idx: float(v[idx].mean())


def fd_statistic(real: GaussianStats | torch.Tensor, fake_features: torch.Tensor) -> Statistic:
    """FD of the generated feature rows ``(N, d)`` at the given indices against the fixed real
    statistics (or real features)."""
    fake = fake_features.detach().to(torch.float64).cpu()
    reference = FrechetReference(real)  # the real side factored once for every draw
    return lambda idx: reference.distance(fake[idx])


def cmmd_statistic(real_features: torch.Tensor, fake_features: torch.Tensor, sigma: float = CMMD_SIGMA,
                   scale: float = CMMD_SCALE,
                   estimator: Literal["biased", "unbiased"] = DEFAULT_ESTIMATOR) -> Statistic:
    """CMMD of the fixed real embeddings against the generated rows ``(N, d)`` at the given indices."""
    real = real_features.detach().to(torch.float64).cpu()
    fake = fake_features.detach().to(torch.float64).cpu()
    return lambda idx: cmmd(real, fake[idx], sigma=sigma, scale=scale, estimator=estimator)


def bootstrap_distribution(statistic: Statistic, indices: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64: ``statistic`` on each row of ``indices`` ``(B, N)``."""
    if indices.ndim != 2:
        raise ValueError(f"need (B, N) indices, got shape {tuple(indices.shape)}")
    return torch.tensor([statistic(row) for row in indices], dtype=torch.float64)


def percentile_interval(samples: torch.Tensor, level: float = LEVEL) -> list[float]:
    """``[lo, hi]``: the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of ``samples``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = samples.detach().to(torch.float64).reshape(-1)
    if s.numel() == 0:
        raise ValueError("no bootstrap samples")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(s, q).tolist()
    return [lo, hi]


def _centred(value: float, samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``samples`` less their bootstrap bias ``mean(samples) - value``, and that bias."""
    s = samples.detach().to(torch.float64).reshape(-1)
    bias = float(s.mean()) - float(value)
    return s - bias, bias


def summary(value: float, distribution: torch.Tensor, level: float = LEVEL,
            centre: bool = False) -> dict[str, float | list[float]]:
    """``{"value": value, "ci95": [lo, hi]}`` for one target and metric; with ``centre`` (FD,
    CMMD: statistics that resampling biases) also ``bootstrap_bias``, the shift taken out of the
    distribution before its quantiles are read (see the module docstring)."""
    if not centre:
        return {"value": float(value), "ci95": percentile_interval(distribution, level)}
    shifted, bias = _centred(value, distribution)
    return {"value": float(value), "ci95": percentile_interval(shifted, level), "bootstrap_bias": bias}


def paired_summary(value: float, reference_value: float, distribution: torch.Tensor,
                   reference_distribution: torch.Tensor, level: float = LEVEL,
                   centre: bool = False) -> dict[str, float | list[float]]:
    """``{"delta": value - reference_value, "delta_ci95": [lo, hi]}``; ``centre`` as in
    :func:`summary`, applied to the draw-by-draw differences.

    The two distributions must come from the *same* index draws (row by row), which is what makes
    the difference paired.

    Raises:
        ValueError: If the distributions differ in length.
    """
    if distribution.shape != reference_distribution.shape:
        raise ValueError(f"paired distributions need the same draws, got {tuple(distribution.shape)} "
                         f"and {tuple(reference_distribution.shape)}")
    delta = float(value) - float(reference_value)
    diff = distribution.to(torch.float64) - reference_distribution.to(torch.float64)
    if centre:
        diff, _ = _centred(delta, diff)
    return {"delta": delta, "delta_ci95": percentile_interval(diff, level)}
