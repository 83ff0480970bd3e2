"""Hardware-aligned architectures: kept channels rounded to multiples that fast kernels like.

A width unit owns ``unit_width`` channels (a GroupNorm group, a head, an FFN group). Kept
channels of a layer are ``k · unit_width``; GEMM and convolution kernels run fastest when that is
a multiple of 8 (tensor cores, AVX-512 lanes of fp32 ×16) or 64. With SD 2.1's ResBlocks of 320
channels in 32 groups (10 channels a unit), keeping 13 units gives 130 channels, a shape the
kernels pad or handle with a slow tail. :func:`align_vector` rounds each layer's kept-unit count
to the nearest multiple of ``lcm(unit_width, multiple) / unit_width`` units, keeping the units
with the highest scores, and then gives back MACs where rounding up overshot the budget, so the
aligned vector stays at or below the MACs ratio it had (or the budget given).

Depth units and the width of layers inside a dropped depth block (any enclosing one, for nested
SDXL transformer blocks) are left as they are.
"""

from __future__ import annotations

import math

import torch

from aptp.engine.macs import MacsModel
from aptp.engine.space import ArchSpace

__all__ = ["align_vector", "aligned_fraction"]


def _step(unit_width: int, multiple: int) -> int:
    return math.lcm(unit_width, multiple) // unit_width


def aligned_fraction(space: ArchSpace, vector: torch.Tensor, multiple: int) -> float:
    """Fraction of the live width layers whose kept channels are a multiple of ``multiple``
    (or the layer's full width, which is the original model's shape)."""
    v = space.check_vector(vector).reshape(-1)
    live = aligned = 0
    for s in space.segments:
        if s.kind == "depth" or not space.is_live(s, v):
            continue
        k = int((v[s.offset : s.stop] >= 0.5).sum())
        if k == 0:
            continue
        live += 1
        aligned += (k * s.unit_width) % multiple == 0 or k == s.size
    return aligned / live if live else 1.0


def align_vector(space: ArchSpace, vector: torch.Tensor, macs: MacsModel, multiple: int,
                 budget: float | None = None, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Round every width layer's kept channels to a multiple of ``multiple`` within the budget.

    Args:
        space: the architecture space.
        vector: (D,) hard vector (entries ≥ 0.5 are kept).
        macs: the analytic MACs model of ``space``.
        multiple: channel multiple (e.g. 8 or 64); 1 returns the vector unchanged.
        budget: MACs ratio not to exceed; default the ratio of ``vector`` itself.
        scores: (D,) importance of each unit (e.g. the code's logits); units with higher scores
            are kept first. Default: the kept units, in index order.

    Returns:
        (D,) float hard vector. Each layer is rounded to the nearest aligned count (its full
        width counts as aligned); where that overshoots the budget, the layers that grew most
        step down again, at worst back to their own unaligned count, so the result never
        exceeds the budget when the budget is the vector's own ratio.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    v = (space.check_vector(vector).reshape(-1) >= 0.5).to(torch.float64)
    if multiple == 1:
        return v.float()
    limit = float(macs.ratio(v)[0]) if budget is None else float(budget)
    if scores is None:
        scores = v - torch.arange(space.size, dtype=torch.float64) / (10 * space.size)
    scores = scores.reshape(-1).to(torch.float64)
    out = v.clone()
    layers = []  # (segment, step, order of units by score, original kept count)
    for s in space.segments:
        if s.kind == "depth" or not space.is_live(s, v):
            continue
        k = int(v[s.offset : s.stop].sum())
        step = _step(s.unit_width, multiple)
        if k == 0 or step == 1:
            continue
        order = torch.argsort(scores[s.offset : s.stop], descending=True, stable=True)
        aligned = sorted({*range(step, s.size + 1, step), s.size})
        target = min(aligned, key=lambda a: (abs(a - k), a))  # nearest; ties round down
        # below the smallest aligned width the layer may fall back to its own, unaligned count
        allowed = ([k] if k < aligned[0] else []) + aligned
        layers.append([s, allowed, order, k, target])
        _keep(out, s, order, target)
    # rounding up may overshoot: step down the layers that grew most, cheapest first
    while float(macs.ratio(out)[0]) > limit + 1e-9:
        best = None
        for layer in layers:
            s, allowed, order, k, target = layer
            i = allowed.index(target)
            if i == 0:
                continue
            trial = out.clone()
            _keep(trial, s, order, allowed[i - 1])
            key = (target - k, -float(macs.ratio(trial)[0]))  # grew most, then saves most
            if best is None or key > best[0]:
                best = (key, layer, allowed[i - 1])
        if best is None:
            break  # nothing left to give back: every layer at its smallest allowed width
        _, layer, new_target = best
        layer[4] = new_target
        _keep(out, layer[0], layer[2], new_target)
    return out.float()


def _keep(v: torch.Tensor, s, order: torch.Tensor, count: int) -> None:
    seg = torch.zeros(s.size, dtype=v.dtype)
    seg[order[:count]] = 1
    v[s.offset : s.stop] = seg
