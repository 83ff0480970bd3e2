"""The seam between the shared pruning engine and one backbone family.

The engine's shared parts — the architecture vector (:class:`~aptp.engine.space.ArchSpace`), the
gate mechanics (:mod:`aptp.engine.gates`), the analytic MACs model (:mod:`aptp.engine.macs`),
plan replay (:mod:`aptp.engine.slicing`), expert files, routing and the training loops — never
look at a block type. Everything they need to know about a family of denoisers (the U-Nets of
SD 1.x / 2.x / SDXL, PixArt's cross-attention DiT, the MMDiTs of SD3 and Flux) comes from its
:class:`Backbone`, the way Torch-Pruning registers one pruner per layer type and diffusers one
processor per attention type:

- **units**: the width segments (heads, channel groups) and depth segments (skippable residual
  blocks) of a model, in execution order (:meth:`Backbone.segments`);
- **gates**: where each width unit's mask sits so that masked ≡ sliced
  (:meth:`Backbone.gate_targets`: the input channels of one or more linear / conv layers), and how
  a gated depth block mixes its output with what a skipped block passes on
  (:meth:`Backbone.depth_mixer`);
- **MACs**: which recorded layers (and attention matmuls) each unit owns
  (:meth:`Backbone.unit_cost`), the dummy inputs of one forward and the forward itself
  (:meth:`Backbone.dummy_inputs`, :meth:`Backbone.forward`);
- **slicing**: one slicer per plan operation (:meth:`Backbone.slice`) and the module a skipped
  block becomes (:meth:`Backbone.skip_module`);
- **baselines and distillation**: the weights whose norm ranks a unit
  (:meth:`Backbone.unit_norms`) and the blocks whose outputs are distilled
  (:meth:`Backbone.distill_blocks`);
- **pipelines**: the pipeline attribute holding the denoiser, how prompts become its conditioning,
  the starting noise of one seed and the extra arguments of a pipeline call.

A backbone is registered in :mod:`aptp.engine.backbones` under the diffusers class names it
handles; :func:`aptp.engine.backbones.backbone_for` finds it from a model or a config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from aptp.errors import AptpUserError


class UnsupportedModelError(AptpUserError, ValueError):
    """A denoiser the engine can not gate or slice; the message names what is unsupported."""


@dataclass
class UnitCost:
    """What one channel of a width segment costs, in terms of the layers recorded in one forward.

    Attributes:
        layers: ``(layer path, channels)`` pairs: the unit's channels own ``1 / channels`` of that
            conv / linear layer's MACs per channel (the layer's output rows or input columns along
            the axis the unit spans).
        attention: path of an attention module whose QKᵀ and AV matmuls scale with these channels
            (heads), or None.
    """

    layers: list[tuple[str, int]] = field(default_factory=list)
    attention: str | None = None


def get(config, key: str, default=None):
    """A key of a config given as a dict or as a diffusers ``FrozenDict`` / attribute object."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


def depth_unit(depth: list[dict], path: str, block: str, depth_policy: str, parent: int = -1) -> int:
    """Append the depth segment of the skippable block at ``path`` (policy ``paper``) and return
    its index in ``depth``; -1 (nothing appended) under policy ``none``."""
    if depth_policy != "paper":
        return -1
    depth.append(dict(kind="depth", module=path, size=1, unit_width=1, block=block, op="skip", parent=parent))
    return len(depth) - 1


def mix(u: torch.Tensor, out: torch.Tensor | None, inp: torch.Tensor | None) -> torch.Tensor | None:
    """``u·out + (1−u)·inp`` with a (B, 1) gate broadcast over ``out``'s trailing dims."""
    if out is None or inp is None:
        return out
    g = u.to(out.dtype).view(-1, *([1] * (out.ndim - 1)))
    return g * out + (1 - g) * inp


class Backbone:
    """One family of denoisers. Subclasses fill in every method; see the module docstring."""

    name: str = ""
    classes: tuple[str, ...] = ()  # diffusers class names handled
    pipelines: tuple[str, ...] = ()  # diffusers pipeline classes whose folders hold it
    component: str = "unet"  # the pipeline attribute holding the denoiser
    kinds: tuple[str, ...] = ()  # unit kinds of its architecture vectors, in report order
    default_text_len: int = 77  # text tokens of the MACs convention when the model gives none

    # ------------------------------------------------------------------ configs
    def check_config(self, config, name: str) -> None:
        """Refuse, before anything is built, a config the engine can not handle (one line)."""

    def check_model(self, model: nn.Module) -> None:
        """:meth:`check_config` plus the module types the gates and slicers rely on."""
        self.check_config(model.config, type(model).__name__)

    def build(self, config, device: str | torch.device = "meta") -> nn.Module:
        """The model of ``config`` on ``device`` (meta: no memory, no random init)."""
        import diffusers

        cls = getattr(diffusers, get(config, "_class_name") or self.classes[0])
        with torch.device(device):
            return cls.from_config(config)

    # ------------------------------------------------------------------ units
    def segments(self, model: nn.Module, ffn_groups: int, depth_policy: str) -> tuple[list[dict], list[dict]]:
        """(width, depth) segment descriptions in execution order.

        A width dict has ``kind, module, size, unit_width, block, op, depth`` (``depth``: index into
        the depth list of the innermost enclosing skippable block, or -1); a depth dict has
        ``kind="depth", module, size=1, unit_width=1, block, op="skip", parent`` (the enclosing
        depth index or -1).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ gates
    def gate_targets(self, model: nn.Module, seg) -> list[tuple[nn.Module, int]]:
        """``(layer, first channel)`` pairs: the segment's channels are the input channels
        ``[first, first + size·unit_width)`` of each layer (dim 1 of a conv, the last of a linear)."""
        raise NotImplementedError

    def depth_mixer(self, model: nn.Module, seg) -> Callable[[tuple, dict, Any, torch.Tensor], Any]:
        """``mixer(args, kwargs, output, u)``: the block's output gated by ``u`` (B, 1), equal to
        the block's output at u = 1 and to what the skipped block passes on at u = 0."""
        raise NotImplementedError

    # ------------------------------------------------------------------ MACs
    def unit_cost(self, model: nn.Module, seg) -> UnitCost:
        raise NotImplementedError

    def dummy_inputs(self, config, latent_size: tuple[int, int], text_len: int, batch: int = 1,
                     device: str = "meta"):
        """(sample, timestep, Conditioning) of one forward at ``latent_size`` (latent pixels)."""
        raise NotImplementedError

    def forward(self, model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """The denoiser's prediction for a (B, C, h, w) latent, in the latent's shape (any packing,
        learned-variance channels or timestep scaling of the family is handled here). ``model``
        may be wrapped (DDP, accelerate): it is only called."""
        raise NotImplementedError

    def block_of(self, name: str) -> str:
        """The top-level block a module path belongs to, for per-block reports."""
        raise NotImplementedError

    def block_names(self, model: nn.Module) -> list[str]:
        """The top-level blocks (as :meth:`block_of` names them) in execution order, ``other``
        left out. The default takes them in module-registration order, which is the execution
        order of the transformer backbones."""
        out: list[str] = []
        for name, _ in model.named_modules():
            b = self.block_of(name) if name else "other"
            if b != "other" and b not in out:
                out.append(b)
        return out

    # ------------------------------------------------------------------ slicing
    def slicers(self) -> dict[str, Callable[[nn.Module, list[int], int], nn.Module]]:
        """Plan operation name → slicer ``fn(module, keep, unit_width)`` (``skip`` excepted)."""
        raise NotImplementedError

    def slice(self, module: nn.Module, op: dict) -> nn.Module:
        """Apply one plan operation (not ``skip``) to ``module``; return it or its replacement."""
        fn = self.slicers().get(op["op"])
        if fn is None:
            raise ValueError(f"unknown plan operation {op['op']!r} for a {self.name} model")
        return fn(module, op["keep"], op["unit_width"])

    def skip_module(self, module: nn.Module) -> nn.Module:
        """What a skipped depth block becomes (computes what the gate passes on at u = 0)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ baselines, distillation
    def unit_norms(self, model: nn.Module, seg) -> torch.Tensor:
        """(size·unit_width,) L1 norm of the weights producing each channel of a width segment."""
        raise NotImplementedError

    def distill_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks whose output hidden states are distilled (App. D.4, Eq. 28)."""
        raise NotImplementedError

    def block_hidden(self, output) -> torch.Tensor:
        """The hidden state in a distilled block's output (U-Net down blocks return
        ``(hidden_states, skip_states)``; the others a tensor)."""
        return output[0] if isinstance(output, tuple) else output

    # ------------------------------------------------------------------ pipelines
    def encode_prompts(self, pipe, prompts: list[str], size: tuple[int, int] | None, text_len: int):
        """The :class:`~aptp.models.conditioning.Conditioning` of ``prompts`` exactly as ``pipe``
        computes it for sampling (no classifier-free-guidance half)."""
        raise NotImplementedError

    def latent_channels(self, config) -> int:
        """Channels of the (unpacked) latent the VAE produces."""
        return int(get(config, "in_channels"))

    def initial_latents(self, config, seed: int, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
        """(1, ...) starting noise of one prompt as the pipeline takes it, a function of the seed."""
        g = torch.Generator("cpu").manual_seed(seed)
        return torch.randn((1, self.latent_channels(config), height // vae_scale_factor, width // vae_scale_factor),
                           generator=g)

    def text_len(self, pipe) -> int:
        """Text tokens per prompt the denoiser sees in ``pipe`` (:meth:`text_len_from` its tokenizers)."""
        lengths = {n: int(getattr(pipe, n).model_max_length) for n in ("tokenizer", "tokenizer_2", "tokenizer_3")
                   if getattr(pipe, n, None) is not None}
        return self.text_len_from(type(pipe).__name__, lengths)

    def text_len_from(self, pipeline_class: str | None, lengths: dict[str, int]) -> int:
        """Text tokens per prompt from the tokenizers' ``model_max_length`` (by pipeline attribute
        name; a huge sentinel means unset), for a pipeline and for a folder alike."""
        n = lengths.get("tokenizer")
        return n if n is not None and 0 < n <= 4096 else self.default_text_len

    def call_kwargs(self, pipe, text_len: int) -> dict:
        """Extra keyword arguments of a pipeline call (sequence length, binning, ...)."""
        return {}

    def native_size(self, config, vae_scale_factor: int) -> int:
        """The image size the model generates at."""
        return int(get(config, "sample_size")) * vae_scale_factor
