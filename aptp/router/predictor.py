"""Architecture predictor f_AP: prompt embedding z → architecture embedding e (paper Eq. 4, App. D.1)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DEFAULT_INIT_BIAS", "ArchitecturePredictor"]

DEFAULT_INIT_BIAS = 3.0
"""Initial logit of every unit.

A unit's gate is ``sigmoid((e + g)/γ)`` with Logistic noise ``g``, i.e. a relaxed Bernoulli
with keep probability ``sigmoid(e)`` (independent of γ). At ``e = 3`` that is 0.953 per unit
and the noise-free gate is ``sigmoid(3/0.4) = 0.9994``: training starts next to the teacher
(expected MACs ratio ≈ 0.9–0.95), above every paper budget (0.64–0.85), so the
resource loss only has to pull *down* and the denoising / distillation losses start near their
minimum. The value matches the official implementation, which adds a constant ``base`` of 3
to the logits inside its Gumbel-sigmoid (COCO config ``quantizer_base: 3``); we put it in the
bias instead, so a logit means what it says (``e ≥ 0`` ⇔ unit kept by the hard mask).
"""


class ArchitecturePredictor(nn.Module):
    """One linear layer ``e = W z + b`` from prompt embeddings to architecture logits.

    Initialisation: ``W`` orthogonal (as in the official implementation), so the map starts
    norm-preserving and distinct prompts start at distinct, if close, logits; ``b`` is the
    constant ``init_bias`` (see :data:`DEFAULT_INIT_BIAS`).

    Args:
        z_dim: prompt-encoder output size (384 for all-MiniLM-L6-v2, 768 in the paper).
        arch_dim: D, the length of an architecture vector (1,620 for SD 2.1).
        init_bias: initial logit of every unit.
        generator: RNG for the weight initialisation (``None`` = global RNG).
    """

    def __init__(self, z_dim: int, arch_dim: int, init_bias: float = DEFAULT_INIT_BIAS,
                 generator: torch.Generator | None = None):
        super().__init__()
        if z_dim < 1 or arch_dim < 1:
            raise ValueError(f"z_dim and arch_dim must be >= 1, got z_dim={z_dim}, arch_dim={arch_dim}")
        self.z_dim = z_dim
        self.arch_dim = arch_dim
        self.linear = nn.Linear(z_dim, arch_dim)
        with torch.no_grad():
            nn.init.orthogonal_(self.linear.weight, generator=generator)
            self.linear.bias.fill_(init_bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim) prompt embeddings → (B, D) architecture logits e."""
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"prompt embeddings have {z.shape[-1]} features, the predictor expects {self.z_dim}")
        return self.linear(z.to(self.linear.weight.dtype))
