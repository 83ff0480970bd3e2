"""Sinkhorn-Knopp optimal transport with equipartition (paper Eq. 5–7, SwAV's distributed form).

Given similarities ``S`` (B, N) between B architecture embeddings and N codes, the entropic OT
problem ``max_Q Tr(Qᵀ Aᵀ E) + ε H(Q)`` with equipartition constraints (every code receives
B/N samples, every sample one unit of mass) has the solution ``Q* = diag(m) exp(S/ε) diag(n)``
(Eq. 7). ``m`` and ``n`` come from a few alternating row / column normalisations.

Distributed: the batch is split over processes. Only two kinds of sums cross the batch
dimension — the total mass and the per-code (row) mass — and those go through ``all_reduce``
(a SUM over processes). The per-sample (column) normalisation is local. So two processes with
half the batch each compute exactly the assignment of one process with the whole batch, without
gathering the (B, N) matrix anywhere (SwAV's ``distributed_sinkhorn``, Caron et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["AllReduce", "sinkhorn"]

AllReduce = Callable[[torch.Tensor], torch.Tensor]
"""SUM over processes of a tensor of the same shape on every process; returns the result."""

# Exponents are clipped to ±250: float64 then holds the ratio of the largest to the smallest
# entry (e^500 ≈ 1e217) with room for the normalisations, so no row or column can underflow
# to all zeros (0/0) or overflow.
_MAX_EXPONENT = 250.0


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """Equipartitioned soft assignment of samples to codes (paper Eq. 7).

    Works in float64. Before exponentiating, each code's row is shifted by its mean score over
    the global batch: the first row normalisation cancels any per-row factor exactly, so the
    result is unchanged, while ``exp`` stays in range. Exponents are also clipped to ±250, which
    only matters for scores more than 250·ε from their code's mean — never for cosine
    similarities at ε ≥ 0.008; beyond that the result stays finite but is approximate.
    Every process issues the same collectives in the same order whatever its data (also with
    an empty local batch), so nothing here can deadlock on one rank's input.

    Args:
        scores: (B, N) similarities of the local samples to the N codes (cosines in [-1, 1]
            in the router). No gradient flows through the assignment.
        epsilon: entropic regularisation ε (paper: 0.05). Small ε gives near one-hot rows.
        iterations: Sinkhorn iterations (paper: 3).
        all_reduce: SUM over processes (e.g. ``torch.distributed.all_reduce``); ``None`` for a
            single process. Must return the reduced tensor (it may also reduce in place).

    Returns:
        (B, N) assignment in ``scores.dtype``: each row (sample) sums to 1; each column (code)
        sums to about B_global/N over the global batch. ``argmax(dim=1)`` is the code index of
        Eq. 20.

    Raises:
        ValueError: ``scores`` not 2-D, ``epsilon`` ≤ 0 or ``iterations`` < 1.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (B, N), got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    reduce = all_reduce or _identity
    out_dtype = scores.dtype if scores.is_floating_point() else torch.float32
    s = scores.detach().to(torch.float64)  # (B, N)
    b_local, n_codes = s.shape

    # one collective: per-code score sums (for the shift) and the global batch size
    stats = torch.cat([s.sum(dim=0), s.new_tensor([float(b_local)])])  # (N + 1,)
    stats = reduce(stats)
    b_global = float(stats[-1])
    if b_global <= 0:
        return scores.new_zeros((b_local, n_codes), dtype=out_dtype)
    row_shift = stats[:-1] / b_global  # (N,) mean score of each code over the global batch

    exponent = ((s - row_shift) / epsilon).clamp(-_MAX_EXPONENT, _MAX_EXPONENT)
    q = torch.exp(exponent).T.contiguous()  # (N, B): codes × samples, as in the paper

    q /= reduce(q.sum().reshape(1))  # total mass 1
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))  # every code: mass 1/N ...
        q /= n_codes
        q /= q.sum(dim=0, keepdim=True)  # ... every sample: mass 1/B (local)
        q /= b_global
    q *= b_global  # each sample's column sums to 1: an assignment
    return q.T.to(out_dtype)  # (B, N)
