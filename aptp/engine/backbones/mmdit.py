"""Shared parts of the MMDiT backbones (SD3's ``JointTransformerBlock``, Flux's double-stream
``FluxTransformerBlock``): joint-attention heads, two-stream depth gates and their replacement
modules.

A joint attention runs one softmax over the image and text tokens together. Head ``h`` is
``head_dim`` rows of ``to_q / to_k / to_v`` (image stream) *and* of ``add_q_proj / add_k_proj /
add_v_proj`` (text stream), and the same ``head_dim`` input columns of ``to_out[0]`` (image) and
``to_add_out`` (text; absent in SD3's last, ``context_pre_only`` block, whose text stream still
feeds the keys and values). The mask of a ``joint_attn_heads`` unit sits at the inputs of both
output projections (one head mask, two gate targets), which is exactly removing the head: the
attention of each head is independent, and the per-head q / k norms (``norm_q``, ``norm_k``,
``norm_added_q``, ``norm_added_k``: over ``head_dim``) are kept whole.

An MMDiT block is called as ``block(hidden_states=…, encoder_hidden_states=…, temb=…, …)`` and
returns ``(encoder_hidden_states, hidden_states)``; both streams are residual, so its depth gate
mixes both: ``(u·enc_out + (1−u)·enc_in, u·hid_out + (1−u)·hid_in)``, and a skipped block passes
both through (SD3's last block returns ``None`` for the text stream, and so does its replacement).
"""

from __future__ import annotations

import torch
from torch import nn

from aptp.engine import slicers as S
from aptp.engine.backbones.base import UnitCost, mix

JOINT_HEADS = "joint_attn_heads"
JOINT_OP = "joint_heads"

_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def head_dim(attn: nn.Module) -> int:
    """Channels per head of a diffusers ``Attention`` or ``FluxAttention``."""
    hd = getattr(attn, "head_dim", None)
    return int(hd) if hd else attn.inner_dim // attn.heads


def _projections(attn: nn.Module) -> list[str]:
    return [n for n in _PROJECTIONS if getattr(attn, n, None) is not None]


def _outputs(attn: nn.Module) -> list[nn.Linear]:
    outs = [attn.to_out[0]]
    if getattr(attn, "to_add_out", None) is not None:
        outs.append(attn.to_add_out)
    return outs


# ---------------------------------------------------------------------------- units
def joint_attention_segment(attn: nn.Module, path: str, block: str, depth: int) -> dict:
    """The ``joint_attn_heads`` segment of a joint (two-stream) attention at ``path``."""
    return dict(kind=JOINT_HEADS, module=path, size=attn.heads, unit_width=head_dim(attn), block=block, op=JOINT_OP,
                depth=depth)


def joint_gate_targets(attn: nn.Module) -> list[tuple[nn.Module, int]]:
    """The head mask sits at the input of ``to_out[0]`` and (when present) ``to_add_out``."""
    return [(lin, 0) for lin in _outputs(attn)]


def joint_attention_cost(attn: nn.Module, path: str) -> UnitCost:
    """q / k / v rows of both streams, both output projections' columns and the joint matmuls."""
    inner = attn.inner_dim
    layers = [(f"{path}.{n}", inner) for n in _projections(attn)]
    layers.append((f"{path}.to_out.0", inner))
    if getattr(attn, "to_add_out", None) is not None:
        layers.append((f"{path}.to_add_out", inner))
    return UnitCost(layers, attention=path)


def joint_attention_norms(attn: nn.Module) -> torch.Tensor:
    """(inner,) L1 norm of the rows producing each channel: q / k / v of both streams."""
    return sum(getattr(attn, n).weight.detach().abs().sum(1) for n in _projections(attn))


def joint_mixer(args: tuple, kwargs: dict, output, u: torch.Tensor):
    """Depth gate of a block ``(hidden_states, encoder_hidden_states, …) -> (enc, hid)``."""
    hid_in = args[0] if args else kwargs["hidden_states"]
    enc_in = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
    enc_out, hid_out = output
    return mix(u, enc_out, enc_in), mix(u, hid_out, hid_in)


# ---------------------------------------------------------------------------- slicing
class JointConstantOutput(nn.Module):
    """A joint attention whose every head was pruned: both output projections see zeros, so the
    image stream gets ``to_out[0]``'s bias and the text stream ``to_add_out``'s (``None`` in a
    ``context_pre_only`` attention, whose text output the block discards)."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.to_out = S.ConstantOutput(attn.to_out[0])
        add = getattr(attn, "to_add_out", None)
        self.to_add_out = S.ConstantOutput(add) if add is not None else None
        self.heads = 0
        self.inner_dim = 0
        self.context_pre_only = getattr(attn, "context_pre_only", None)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args,
                **kwargs):
        out = self.to_out(hidden_states)
        if encoder_hidden_states is None:
            return out
        ctx = self.to_add_out(encoder_hidden_states) if self.to_add_out is not None else None
        return out, ctx


def slice_joint_attention(attn: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep whole heads of a joint attention (both streams); derived attributes are updated."""
    if not keep:
        return JointConstantOutput(attn)
    ch = S._channels(keep, unit_width, attn.to_q.weight.device)
    for name in _projections(attn):
        setattr(attn, name, S._slice_linear(getattr(attn, name), rows=ch))
    attn.to_out[0] = S._slice_linear(attn.to_out[0], cols=ch)
    if getattr(attn, "to_add_out", None) is not None:
        attn.to_add_out = S._slice_linear(attn.to_add_out, cols=ch)
    attn.heads = len(keep)
    attn.inner_dim = len(ch)
    for name in ("inner_kv_dim",):
        if hasattr(attn, name):
            setattr(attn, name, len(ch))
    if hasattr(attn, "sliceable_head_dim"):
        attn.sliceable_head_dim = len(keep)
    return attn


class SkippedJointBlock(nn.Module):
    """An MMDiT block removed by depth pruning: passes both streams through, as
    ``(encoder_hidden_states, hidden_states)`` (``None`` for the text stream of a
    ``context_pre_only`` block, as the block itself returns)."""

    def __init__(self, context_pre_only: bool = False):
        super().__init__()
        self.context_pre_only = bool(context_pre_only)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None, *args,
                **kwargs):
        return (None if self.context_pre_only else encoder_hidden_states), hidden_states


def check_not_fused(attn: nn.Module, path: str) -> None:
    """Fused q / k / v projections (``fuse_qkv_projections``) can not be gated per head."""
    from aptp.engine.backbones.base import UnsupportedModelError

    if getattr(attn, "fused_projections", False) or hasattr(attn, "to_qkv"):
        raise UnsupportedModelError(f"{path}: fused q/k/v projections are not supported (call "
                                    f"unfuse_qkv_projections() first)")


def pipeline_default(pipe, name: str, default):
    """The default of a keyword argument of ``pipe.__call__`` (e.g. ``guidance_scale``)."""
    import inspect

    try:
        p = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return default
    return default if p is None or p.default is inspect.Parameter.empty else p.default


def valid_length(n) -> int | None:
    """A tokenizer ``model_max_length``, or None when unset (transformers' huge sentinel)."""
    try:
        n = int(n)
    except (TypeError, ValueError):
        return None
    return n if 0 < n <= 4096 else None
