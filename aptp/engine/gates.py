"""Soft gates: apply a per-sample architecture vector to a live, stock diffusers U-Net.

Nothing of diffusers is copied: every gate is a forward hook on a stock module, placed where a
zero gate equals removing the unit (so masked ≡ sliced, see DESIGN.md §3):

- ResBlock width: the input of ``conv2`` (after norm2, activation and dropout), per GroupNorm group;
- attention heads: the input of ``to_out[0]``, per head (zeroing queries would not zero a head);
- GEGLU channels: the input of the FFN output linear, per channel group;
- depth: ``F̂ = u·f(F) + (1−u)·F`` around a ResBlock / Transformer2DModel; in up blocks ``F`` is the
  hidden state (the first ``out_channels`` of the concatenated input), as in App. D.3 Eq. 24; the
  same around each residual ``BasicTransformerBlock`` of a multi-block transformer (SDXL), whose
  gate then nests inside its ``Transformer2DModel``'s.

With no vector set, every hook returns ``None`` (the module's own result), so the same module is
the teacher: no second copy of the weights. Hooks are registered on module objects, so wrappers
that prefix module names (DDP's ``module.``) do not affect them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from aptp.engine.space import ArchSpace, Segment


def _expand_batch(v: torch.Tensor, n: int) -> torch.Tensor:
    """Match a (B, ...) gate to a module batch of n = k·B (classifier-free guidance stacks the
    unconditional and conditional halves, so the gates repeat in the same order)."""
    b = v.shape[0]
    if b == n or b == 1:
        return v
    if n % b:
        raise ValueError(f"gate batch {b} does not divide the module batch {n}")
    return v.repeat(n // b, *([1] * (v.ndim - 1)))


class UNetGates:
    """Attach per-sample soft masks to a diffusers ``UNet2DConditionModel``.

    Usage::

        gates = UNetGates(unet, space)
        with gates.apply(vector):          # (B, D) in [0, 1]
            student = unet(x, t, c).sample
        teacher = unet(x, t, c).sample     # gates off: the original model

    Args:
        unet: the U-Net (may be wrapped later by DDP; hooks stay attached to the modules).
        space: its architecture space (``build_space(unet)``).
    """

    def __init__(self, unet: nn.Module, space: ArchSpace):
        self.unet = unet
        self.space = space
        self._vector: torch.Tensor | None = None
        self._handles: list = []
        self._attach()

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        for seg in self.space.segments:
            mod = self.unet.get_submodule(seg.module)
            if seg.kind == "resnet_channels":
                target = mod.conv2
            elif seg.kind in ("self_attn_heads", "cross_attn_heads"):
                target = mod.to_out[0]
            elif seg.kind == "ffn_channels":
                target = mod.net[2]
            else:
                self._handles.append(
                    mod.register_forward_hook(self._depth_hook(seg, mod), with_kwargs=True)
                )
                continue
            self._handles.append(target.register_forward_pre_hook(self._width_hook(seg)))

    def _width_hook(self, seg: Segment):
        def hook(module: nn.Module, args: tuple):
            if self._vector is None:
                return None
            x = args[0]
            # (B, units) -> (B, channels): each unit covers unit_width consecutive channels
            m = self._vector[:, seg.offset : seg.stop].repeat_interleave(seg.unit_width, dim=1)
            m = _expand_batch(m, x.shape[0]).to(x.dtype)
            if x.ndim == 4:  # conv input (B, C, H, W)
                m = m[:, :, None, None]
            else:  # linear input (B, N, C)
                m = m[:, None, :]
            return (x * m,) + tuple(args[1:])

        return hook

    def _depth_hook(self, seg: Segment, mod: nn.Module):
        out_channels = getattr(mod, "out_channels", None)
        is_resnet = hasattr(mod, "conv1")

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if self._vector is None:
                return None
            inp = args[0] if args else kwargs.get("input_tensor", kwargs.get("hidden_states"))
            if is_resnet and inp.shape[1] != out_channels:
                inp = inp[:, :out_channels]  # up block: keep the hidden state, drop the skip
            u = _expand_batch(self._vector[:, seg.offset : seg.offset + 1], inp.shape[0])
            u = u.to(inp.dtype).view(-1, *([1] * (inp.ndim - 1)))
            if isinstance(output, torch.Tensor):
                return u * output + (1 - u) * inp
            if isinstance(output, tuple):
                return (u * output[0] + (1 - u) * inp,) + tuple(output[1:])
            output.sample = u * output.sample + (1 - u) * inp
            return output

        return hook

    # ------------------------------------------------------------------ API
    @contextmanager
    def apply(self, vector: torch.Tensor | None) -> Iterator[None]:
        """Gate every forward inside the block with ``vector`` ((B, D) or (D,)); None = gates off."""
        previous = self._vector
        self._vector = None if vector is None else self.space.check_vector(vector)
        try:
            yield
        finally:
            self._vector = previous

    @contextmanager
    def off(self) -> Iterator[None]:
        """Run the original (teacher) model inside the block, even within ``apply``."""
        with self.apply(None):
            yield

    def remove(self) -> None:
        """Detach all hooks; the U-Net is left exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
