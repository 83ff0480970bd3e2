"""Static pruning baselines in the same architecture space (for fair comparisons at equal MACs).

Weight-norm pruning (Li et al., 2017, "Pruning Filters for Efficient ConvNets"): rank the width
units by the L1 norm of the weights that produce them and remove the weakest until the analytic
MACs reach the budget. Norms are compared relative to their layer's mean, so every layer is
pruned by how weak a unit is *within* it (raw norms differ by orders of magnitude across
layers); every layer keeps at least one unit; depth units are kept (width-only pruning).

BK-SDM-style block removal (Kim et al., 2024): whole blocks go first, in the order given (least
important first), as many as the budget allows; widths then pruned by weight norm to meet it
(:func:`block_removal_vector`; the candidates and their order come from
:mod:`aptp.train.bk_sdm`).
"""

from __future__ import annotations

import torch
from torch import nn

from aptp.engine.macs import MacsModel
from aptp.engine.space import ArchSpace


def unit_l1_norms(unet: nn.Module, space: ArchSpace) -> torch.Tensor:
    """(D,) L1 norm of the weights producing each width unit (NaN at depth units)."""
    from aptp.engine.backbones import backbone_for

    backbone = backbone_for(unet)
    norms = torch.full((space.size,), float("nan"), dtype=torch.float64)
    for seg in space.segments:
        if seg.kind == "depth":
            continue
        rows = backbone.unit_norms(unet, seg)
        norms[seg.offset : seg.stop] = rows.double().view(seg.size, seg.unit_width).sum(1)
    return norms


def weight_norm_vector(unet: nn.Module, space: ArchSpace, macs: MacsModel, budget: float) -> torch.Tensor:
    """A hard (D,) vector keeping the largest-norm units, with MACs ratio just under ``budget``."""
    return importance_vector(space, macs, unit_l1_norms(unet, space), budget)


def importance_vector(space: ArchSpace, macs: MacsModel, norms: torch.Tensor, budget: float,
                      start: torch.Tensor | None = None) -> torch.Tensor:
    """A hard (D,) vector keeping the most important width units (``norms``: (D,) importance,
    NaN at depth units), with MACs ratio just under ``budget``: units are dropped weakest first
    relative to their layer's mean importance, every layer keeps its strongest unit, depth units
    are kept. Shared by weight-norm (L1 norms), Taylor (first-order loss change) and BK-SDM-style
    block removal, whose ``start`` vector has some depth units dropped already: those stay
    dropped and the width units inside them are left alone (they cost nothing and go with
    their block)."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    norms = norms.double()
    v = torch.ones(space.size, dtype=torch.float64) if start is None else start.detach().double().clone()
    score = torch.full_like(norms, float("inf"))
    for seg in space.segments:
        if seg.kind == "depth" or not space.is_live(seg, v):
            continue
        sl = slice(seg.offset, seg.stop)
        rel = norms[sl] / norms[sl].mean().clamp_min(1e-12)
        rel[rel.argmax()] = float("inf")  # every layer keeps its strongest unit
        score[sl] = rel
    order = torch.argsort(score)
    full = macs.full
    # drop units weakest-first; MACs are linear in each unit, so track them incrementally
    current = float(macs(v)[0])
    w = macs.unit_macs.double()
    for i in order.tolist():
        if current / full <= budget or not torch.isfinite(score[i]):
            break
        v[i] = 0.0
        current -= float(w[i])
    return v.float()


def block_removal_vector(space: ArchSpace, macs: MacsModel, norms: torch.Tensor, candidates: list[list[int]],
                         budget: float) -> tuple[torch.Tensor, list[int]]:
    """BK-SDM-style static architecture: remove whole blocks first, then widths to meet the budget.

    ``candidates`` are groups of depth-unit indices (one group per removable block pair), least
    important first. Each group is removed in that order if the MACs ratio stays at or above
    ``budget`` without it (a group that would overshoot is passed over, a later, cheaper one may
    still fit); then width units are pruned by ``norms`` (:func:`importance_vector`) down to the
    budget. Returns the hard (D,) vector and the positions (in ``candidates``) of the removed groups.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    depth = space.depth_mask()
    v = torch.ones(space.size, dtype=torch.float64)
    removed: list[int] = []
    for k, group in enumerate(candidates):
        if not group or not all(bool(depth[i]) for i in group):
            raise ValueError(f"candidate {k}: {group} are not all depth units of this space")
        trial = v.clone()
        trial[group] = 0.0
        if float(macs(trial.float())[0]) / macs.full >= budget:
            v, removed = trial, removed + [k]
    return importance_vector(space, macs, norms, budget, start=v), removed
