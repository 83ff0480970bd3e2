"""Router-side losses of the pruning objective (paper Eq. 13–15, 26).

Distributed convention. Losses over the *global* batch are computed from all-gathered /
all-reduced tensors in which only the local part carries a gradient. Every process then gets
the same loss value and the exact gradient of that value with respect to its *own* samples;
the full gradient is the **sum** of the processes' gradients. DDP (and ``accelerate``) averages
gradients, so multiply such a loss by the world size before ``backward`` —
:func:`scale_gradient` does that without changing the logged value. Per-sample means of local
losses (denoising, distillation) need no scaling: DDP's average is already the global mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from aptp.router.sinkhorn import AllReduce

__all__ = [
    "AllGather",
    "assignment_loss",
    "contrastive_loss",
    "global_mean",
    "resource_loss",
    "routed_mean",
    "scale_gradient",
]

AllGather = Callable[[torch.Tensor], list[torch.Tensor]]
"""Every process's tensor in rank order (dim 0 may differ), without gradient."""

# log(1 - s) is evaluated as log(-expm1(log s)); clamping log s below -1e-12 bounds it at
# log(1e-12) ≈ -27.6 where s rounds to 1 (a lone, very dissimilar sample), like BCE's clamp.
_LOG_S_MAX = -1e-12


def _gather_with_local_grad(x: torch.Tensor, all_gather: AllGather | None, rank: int) -> torch.Tensor:
    """Concatenation over processes of ``x``; the local slice is ``x`` itself (keeps its grad)."""
    if all_gather is None:
        return x
    parts = list(all_gather(x.detach()))
    if not 0 <= rank < len(parts):
        raise ValueError(f"rank {rank} out of range for {len(parts)} gathered parts")
    if parts[rank].shape != x.shape:
        raise ValueError(f"gathered part {rank} has shape {tuple(parts[rank].shape)}, local is {tuple(x.shape)}")
    parts[rank] = x
    return torch.cat(parts, dim=0)


def contrastive_loss(
    z: torch.Tensor,
    e_soft: torch.Tensor,
    tau: float = 0.03,
    all_gather: AllGather | None = None,
    rank: int = 0,
) -> torch.Tensor:
    """Eq. 13–14: make the architecture vectors e′ as similar to each other as the prompts are.

    With cosine similarities, ``r = softmax_rows(sim(z)/τ)`` and ``s = softmax_rows(sim(e′)/τ)``
    over the B×B batch::

        L = −1/B² Σ_ij [ r_ij log s_ij + (1 − r_ij) log(1 − s_ij) ]

    i.e. the binary cross-entropy of ``s`` against the target ``r``. The paper prints Eq. 13
    without the minus sign although it is minimised; this is the minimised form (the official
    implementation computes the same BCE). Computed in float64; ``log(1 − s)`` is taken as
    ``log(−expm1(log s))`` and bounded at about −27.6 where ``s`` rounds to 1.

    Args:
        z: (B, Z) prompt embeddings (no gradient needed).
        e_soft: (B, D) architecture vectors e′ = Gumbel-sigmoid(e) (Eq. 12), with gradient.
        tau: temperature τ of both softmaxes (paper: 0.03).
        all_gather: gather over processes (see :class:`aptp.router.collectives.Collective`);
            the loss is then computed on the global batch, the local rows keep their gradient.
            See the module note on scaling the gradient under DDP.
        rank: this process's index in the gathered list.

    Returns:
        Scalar loss in ``e_soft.dtype``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if z.ndim != 2 or e_soft.ndim != 2 or z.shape[0] != e_soft.shape[0]:
        raise ValueError(f"z and e_soft must be (B, ·) with the same B, got {tuple(z.shape)} and {tuple(e_soft.shape)}")
    z_all = _gather_with_local_grad(z.detach(), all_gather, rank).to(torch.float64)  # (Bg, Z)
    e_all = _gather_with_local_grad(e_soft, all_gather, rank).to(torch.float64)  # (Bg, D)
    zn = F.normalize(z_all, dim=1)
    en = F.normalize(e_all, dim=1)
    r = torch.softmax(zn @ zn.T / tau, dim=1)  # (Bg, Bg) target
    log_s = torch.log_softmax(en @ en.T / tau, dim=1).clamp(max=_LOG_S_MAX)  # (Bg, Bg)
    log_1m_s = torch.log(-torch.expm1(log_s))
    loss = -(r * log_s + (1 - r) * log_1m_s).mean()
    return loss.to(e_soft.dtype)


def assignment_loss(cosines: torch.Tensor, target: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Per-sample cross-entropy of ``softmax(cos(e, a)/τ)`` against the training assignment.

    Not in the paper. During pruning a prompt's code is chosen by Sinkhorn over the batch
    (Eq. 20), at inference by the nearest code (Eq. 22); nothing in Eq. 15 makes the two agree,
    so the codes a prompt trained with need not be the ones it is routed to afterwards. This
    term (SwAV's swapped-prediction loss, Caron et al. 2020, with the hard OT assignment as the
    target) pulls each embedding towards its assigned code and the code towards its
    embeddings, so inference routing inherits the balance optimal transport gave the training.
    Weight ``prune.lambda_assign``; 0 gives the paper's objective.

    Args:
        cosines: (B, N) differentiable cosine similarities of embeddings to codes.
        target: (B,) assigned code index of each sample.
        tau: softmax temperature (SwAV: 0.1).

    Returns:
        (B,) losses; average them with :func:`global_mean` over the global batch.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if cosines.ndim != 2 or target.shape != cosines.shape[:1]:
        raise ValueError(f"cosines must be (B, N) and target (B,), got {tuple(cosines.shape)} and {tuple(target.shape)}")
    logp = torch.log_softmax(cosines.to(torch.float64) / tau, dim=1)
    return -logp.gather(1, target.long().view(-1, 1).to(logp.device)).squeeze(1).to(cosines.dtype)


def resource_loss(macs_ratio: torch.Tensor, budget: float | torch.Tensor) -> torch.Tensor:
    """Eq. 26, ``R(x, y) = log(max(x, y) / min(x, y)) = |log x − log y|``.

    Zero at the budget, symmetric in log space (a factor 2 too high costs as much as a factor
    2 too low), differentiable everywhere except at the budget itself, where its subgradient 0
    is used. ``macs_ratio`` is clamped at 1e-12 so an all-pruned batch cannot give ``log 0``.

    Args:
        macs_ratio: routed mean MACs as a fraction of the full model (scalar tensor), e.g.
            :func:`routed_mean` of the codes' MACs ratios; or one ratio per sample (elementwise,
            ``prune.resource_per: expert``).
        budget: target ratio T_d in (0, 1].
    """
    budget_t = torch.as_tensor(budget, dtype=macs_ratio.dtype, device=macs_ratio.device)
    if bool((budget_t <= 0).any()):
        raise ValueError(f"budget must be > 0, got {budget}")
    return (torch.log(macs_ratio.clamp_min(1e-12)) - torch.log(budget_t)).abs()


def global_mean(values: torch.Tensor, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """Mean of per-sample ``values`` (B,) over the global batch; gradient flows to the local ones.

    Each process contributes its sum and its count through ``all_reduce`` (SUM). Processes may
    hold different batch sizes, including none.
    """
    local_sum = values.sum()
    count = torch.tensor(float(values.numel()), dtype=local_sum.dtype, device=local_sum.device)
    if all_reduce is None:
        return local_sum / count
    totals = all_reduce(torch.stack([local_sum.detach(), count]))
    total = local_sum + (totals[0] - local_sum.detach())  # value: global sum; grad: local part
    return total / totals[1]


def routed_mean(macs_per_code: torch.Tensor, assignment: torch.Tensor,
                all_reduce: AllReduce | None = None) -> torch.Tensor:
    """``T̂(A) = Σ_i B⁽ⁱ⁾/B · T̂(a⁽ⁱ⁾)`` (Eq. 15): the batch mean of each sample's code's MACs.

    Args:
        macs_per_code: (N,) MACs (or MACs ratios) of the codes' soft vectors, differentiable.
        assignment: (B,) code index of each local sample.
        all_reduce: SUM over processes for the global batch mean.
    """
    return global_mean(macs_per_code[assignment], all_reduce)


def scale_gradient(loss: torch.Tensor, factor: float) -> torch.Tensor:
    """Same value as ``loss``, gradient multiplied by ``factor``.

    Use ``scale_gradient(loss, world_size)`` for losses over the global batch under DDP's
    gradient averaging (see the module note).
    """
    if factor == 1:
        return loss
    return loss * factor - loss.detach() * (factor - 1)
