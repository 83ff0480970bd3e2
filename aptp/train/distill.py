"""Block-level outputs of a U-Net for distillation (App. D.4, Eq. 28).

Pruning keeps every block's output shape, so the student (gated or sliced) can be matched to the
teacher block by block. Forward hooks collect the hidden state leaving each down block, the mid
block and each up block; hooks sit on module objects, so DDP's ``module.`` prefix is irrelevant.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def distill_blocks(unet: nn.Module) -> list[nn.Module]:
    """The blocks whose outputs are distilled, as the model's backbone names them (U-Net: down
    blocks, mid block, up blocks; a diffusion transformer: its transformer blocks)."""
    from aptp.engine.backbones import backbone_for

    return backbone_for(unet).distill_blocks(getattr(unet, "module", unet))


@contextmanager
def capture_blocks(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect each distilled block's output hidden state, in execution order, for one forward."""
    from aptp.engine.backbones import backbone_for

    outputs: list[torch.Tensor] = []
    hidden = backbone_for(unet).block_hidden  # the hidden state in a block's output

    def hook(module, args, output):
        outputs.append(hidden(output))

    handles = [b.register_forward_hook(hook) for b in distill_blocks(unet)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (B, ...) → (B,)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def distill_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, student_blocks: list[torch.Tensor],
                 teacher_blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample output-level (Eq. 27) and block-level (Eq. 28, summed over blocks) distillation."""
    if len(student_blocks) != len(teacher_blocks):
        raise ValueError(f"{len(student_blocks)} student blocks vs {len(teacher_blocks)} teacher blocks")
    out = per_sample_mse(student_out, teacher_out.detach())
    block = sum(per_sample_mse(s, t.detach()) for s, t in zip(student_blocks, teacher_blocks))
    return out, block
