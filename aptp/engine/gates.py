"""Soft gates: apply a per-sample architecture vector to a live, stock diffusers denoiser.

Nothing of diffusers is copied: every gate is a forward hook on a stock module, placed where a
zero gate equals removing the unit (so masked ≡ sliced, see DESIGN.md §3). Where each mask sits is
the backbone adapter's answer (:meth:`~aptp.engine.backbones.base.Backbone.gate_targets`: the
input channels of one or more layers; :meth:`~aptp.engine.backbones.base.Backbone.depth_mixer`);
for the U-Net:

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


class Gates:
    """Attach per-sample soft masks to a diffusers denoiser (U-Net or diffusion transformer).

    Usage::

        gates = Gates(model, space)
        with gates.apply(vector):          # (B, D) in [0, 1]
            student = model(x, t, c).sample
        teacher = model(x, t, c).sample    # gates off: the original model

    Args:
        model: the denoiser (may be wrapped later by DDP; hooks stay attached to the modules).
        space: its architecture space (``build_space(model)``).
    """

    def __init__(self, model: nn.Module, space: ArchSpace):
        from aptp.engine.backbones import backbone_for

        self.model = model
        self.space = space
        self.backbone = backbone_for(model)
        self._vector: torch.Tensor | None = None
        self._handles: list = []
        self._attach()

    @property
    def unet(self) -> nn.Module:  # the name before diffusion transformers
        return self.model

    # ------------------------------------------------------------------ hooks
    def _attach(self) -> None:
        for seg in self.space.segments:
            if seg.kind == "depth":
                mod = self.model.get_submodule(seg.module)
                mixer = self.backbone.depth_mixer(self.model, seg)
                self._handles.append(mod.register_forward_hook(self._depth_hook(seg, mixer), with_kwargs=True))
                continue
            for target, start in self.backbone.gate_targets(self.model, seg):
                self._handles.append(target.register_forward_pre_hook(self._width_hook(seg, start)))

    def _width_hook(self, seg: Segment, start: int):
        n = seg.size * seg.unit_width

        def hook(module: nn.Module, args: tuple):
            if self._vector is None:
                return None
            x = args[0]
            # (B, units) -> (B, channels): each unit covers unit_width consecutive channels
            m = self._vector[:, seg.offset : seg.stop].repeat_interleave(seg.unit_width, dim=1)
            m = _expand_batch(m, x.shape[0]).to(x.dtype)
            dim = 1 if x.ndim == 4 else x.ndim - 1  # conv input (B, C, H, W); linear input (B, N, C)
            if start != 0 or n != x.shape[dim]:  # the unit's channels are a range of the input
                full = torch.ones(m.shape[0], x.shape[dim], dtype=m.dtype, device=m.device)
                m = torch.cat([full[:, :start], m, full[:, start + n :]], dim=1)
            m = m[:, :, None, None] if x.ndim == 4 else m.view(m.shape[0], *([1] * (x.ndim - 2)), m.shape[1])
            return (x * m,) + tuple(args[1:])

        return hook

    def _depth_hook(self, seg: Segment, mixer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            if self._vector is None:
                return None
            ref = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            u = _expand_batch(self._vector[:, seg.offset : seg.offset + 1], ref.shape[0])
            return mixer(args, kwargs, output, u)

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
        """Detach all hooks; the model is left exactly as it was."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


UNetGates = Gates  # the name before diffusion transformers
