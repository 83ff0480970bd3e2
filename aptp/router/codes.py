"""Architecture codes (the experts) and the Gumbel-sigmoid relaxation (paper Eq. 9 and 12).

Noise. Eq. 9 reads ``sigmoid((v + g)/γ)`` with ``g ~ Gumbel(0, 1)`` and calls it a relaxation
of Bernoulli(``sigmoid(v)``). For a *binary* relaxation (the Binary Concrete of Maddison et al.
2017 / Gumbel-sigmoid of Jang et al. 2017) ``g`` must be the *difference* of two independent
Gumbel(0, 1) variables, which is Logistic(0, 1) noise ``log u − log(1 − u)``: then
``P(v + g > 0) = sigmoid(v)`` exactly, and the hard mask is a Bernoulli(``sigmoid(v)``) draw.
A single Gumbel sample (what the official code draws) is biased towards keeping
(mean 0.577) and gives ``P(keep) = 1 − exp(−eᵛ)`` instead. We draw Logistic noise.

No noise outside training: ``training=False`` makes every function here deterministic, so an
expert's architecture and a prompt's route never depend on a random state or a batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aptp.router.predictor import DEFAULT_INIT_BIAS

__all__ = ["ArchitectureCodes", "gumbel_sigmoid", "kmeanspp_indices", "logistic_noise"]

_EPS = 1e-6


def logistic_noise(shape: torch.Size | tuple[int, ...], *, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logistic(0, 1) samples, the difference of two Gumbel(0, 1) samples: ``log u − log(1 − u)``."""
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype).clamp_(_EPS, 1 - _EPS)
    return torch.log(u) - torch.log1p(-u)


class _StraightThrough(torch.autograd.Function):
    """Value of ``hard`` exactly (no ``hard + soft − soft`` rounding), gradient of ``soft``."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def gumbel_sigmoid(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    hard: bool = False,
    training: bool = True,
) -> torch.Tensor:
    """Relaxed Bernoulli gates ``sigmoid((logits + g)/γ)`` (Eq. 9 / 12), ``g`` Logistic(0, 1).

    Args:
        logits: (..., D) architecture logits (codes ``a`` or embeddings ``e``).
        temperature: γ > 0 (paper: 0.4); smaller is closer to binary.
        generator: RNG of the noise (on ``logits.device``); ``None`` = global RNG.
        hard: return exactly binary gates with a straight-through gradient: in training
            ``1[y ≥ 0.5]`` for the noisy soft gate ``y``; outside training ``1[logits ≥ 0]``
            (gradient of ``sigmoid(logits/γ)``).
        training: draw noise. ``False``: no noise, ``sigmoid(logits/γ)`` (or the hard mask),
            deterministic and differentiable.

    Returns:
        Gates in [0, 1] with the shape and dtype of ``logits``.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if training:
        # drawn in float32 at least: in float16, 1 − 1e-6 rounds to 1 and log1p(−1) = −inf
        noise_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        noise = logistic_noise(logits.shape, generator=generator, device=logits.device, dtype=noise_dtype)
        noise = noise.to(logits.dtype)
        soft = torch.sigmoid((logits + noise) / temperature)
        hard_gate = (soft >= 0.5) if hard else None
    else:
        soft = torch.sigmoid(logits / temperature)
        hard_gate = (logits >= 0) if hard else None  # = (soft >= 0.5) without rounding doubts
    if hard_gate is None:
        return soft
    return _StraightThrough.apply(hard_gate.to(soft.dtype), soft)


def kmeanspp_indices(x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding with the cosine distance ``1 − cos``: indices of ``k`` well spread rows.

    The first row is drawn uniformly; each next one with probability proportional to its squared
    distance to the nearest row already picked. Deterministic for a seeded ``generator``.

    Raises:
        ValueError: fewer than ``k`` rows, or fewer than ``k`` distinct directions.
    """
    n = x.shape[0]
    if k < 1 or n < k:
        raise ValueError(f"need at least {k} embeddings to pick {k} codes, got {n}")
    unit = F.normalize(x.detach().to(torch.float64), dim=1)  # (n, D)
    first = int(torch.randint(n, (1,), generator=generator))
    picked = [first]
    dist = (1 - unit @ unit[first]).clamp_min(0)  # (n,) distance to the nearest pick
    for _ in range(1, k):
        weight = dist.square()
        total = float(weight.sum())
        if total <= 1e-24:
            raise ValueError(
                f"the {n} embeddings have only {len(picked)} distinct directions, fewer than the "
                f"{k} codes; warm up longer or use a larger batch to initialise the codes"
            )
        u = float(torch.rand((), generator=generator, dtype=torch.float64)) * total
        idx = int(torch.searchsorted(torch.cumsum(weight, 0), torch.tensor(u, dtype=torch.float64)))
        idx = min(idx, n - 1)
        while float(weight[idx]) == 0:  # guard against landing on a zero-width bin by rounding
            idx = (idx + 1) % n
        picked.append(idx)
        dist = torch.minimum(dist, (1 - unit @ unit[idx]).clamp_min(0))
    return torch.tensor(picked, dtype=torch.long)


class ArchitectureCodes(nn.Module):
    """N learnable architecture codes ``a⁽ⁱ⁾ ∈ R^D`` (logits), one per expert.

    Initialisation: orthogonal rows plus the predictor's constant ``init_bias`` (the official
    implementation initialises its codebook orthogonally). This is only a placeholder: at the
    end of the warm-up :meth:`init_from` replaces the codes by well spread predictor outputs.

    Args:
        num_codes: N, the number of experts.
        arch_dim: D, the length of an architecture vector.
        init_bias: constant added to the initial logits (see ``predictor.DEFAULT_INIT_BIAS``).
        generator: RNG for the initialisation (``None`` = global RNG).
    """

    def __init__(self, num_codes: int, arch_dim: int, init_bias: float = DEFAULT_INIT_BIAS,
                 generator: torch.Generator | None = None):
        super().__init__()
        if num_codes < 1 or arch_dim < 1:
            raise ValueError(f"num_codes and arch_dim must be >= 1, got {num_codes}, {arch_dim}")
        self.logits = nn.Parameter(torch.empty(num_codes, arch_dim))  # (N, D)
        with torch.no_grad():
            nn.init.orthogonal_(self.logits, generator=generator)
            self.logits.add_(init_bias)

    @property
    def num_codes(self) -> int:
        return self.logits.shape[0]

    @property
    def arch_dim(self) -> int:
        return self.logits.shape[1]

    def forward(self, temperature: float, generator: torch.Generator | None = None, hard: bool = False,
                training: bool | None = None) -> torch.Tensor:
        """(N, D) gates of every code, :func:`gumbel_sigmoid` of the logits.

        ``training=None`` follows ``self.training``.
        """
        training = self.training if training is None else training
        return gumbel_sigmoid(self.logits, temperature, generator=generator, hard=hard, training=training)

    @torch.no_grad()
    def hard_vectors(self) -> torch.Tensor:
        """(N, D) binary expert architectures ``1[a ≥ 0]``: no noise, what slicing keeps."""
        return (self.logits >= 0).to(self.logits.dtype)

    @torch.no_grad()
    def init_from(self, embeddings: torch.Tensor, generator: torch.Generator | None = None,
                  noise_std: float = 0.0, features: torch.Tensor | None = None) -> torch.Tensor:
        """Set the codes to N well spread architecture embeddings (k-means++ picks).

        Called at the end of the warm-up with predictor outputs ``e`` of a large batch: by then
        they meet the budget on average and are diverse (contrastive loss), so every code starts
        as a real, budget-sized architecture and the codes start distinct — optimal transport
        then has meaningful similarities from the first step.

        In multi-process training call it with the same (all-gathered) embeddings and the same
        generator seed on every process, or broadcast the codes afterwards.

        Args:
            embeddings: (M, D) architecture logits, M ≥ N.
            generator: RNG of the picks and the noise.
            noise_std: std of Gaussian noise added to the picked logits (0 = exact copies).
            features: (M, F) vectors the picks are spread in (default ``embeddings``); the
                router passes the space its cosine similarity lives in.

        Returns:
            (N,) indices of the picked rows.
        """
        if embeddings.ndim != 2 or embeddings.shape[1] != self.arch_dim:
            raise ValueError(f"embeddings must be (M, {self.arch_dim}), got {tuple(embeddings.shape)}")
        feats = embeddings if features is None else features
        idx = kmeanspp_indices(feats, self.num_codes, generator=generator)
        new = embeddings.detach()[idx].to(self.logits.dtype).to(self.logits.device)
        if noise_std > 0:
            new = new + noise_std * torch.randn(new.shape, generator=generator, dtype=new.dtype).to(new.device)
        self.logits.copy_(new)
        return idx
