"""The slicer library: paired out/in slicing of stock diffusers modules and the small modules that
replace a skipped block or a layer that lost every unit.

Every function here slices the *given* module's weights (nothing is re-initialised) and updates
the derived attributes diffusers reads (``heads``, ``inner_dim``, ...). Backbone adapters
(:mod:`aptp.engine.backbones`) pick the slicers of their plan operations from here; the plan and
its replay live in :mod:`aptp.engine.slicing`. This module imports nothing of the engine.
"""

from __future__ import annotations

import torch
from torch import nn


# ---------------------------------------------------------------------------- replacement modules
class SkippedResnet(nn.Module):
    """A ResBlock removed by depth pruning: passes the hidden state through.

    In an up block its input is ``cat(hidden, skip)``; it returns the first ``out_channels``
    channels (the hidden state) and drops the skip tensor (App. D.3, Eq. 24).
    """

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
        return input_tensor[:, : self.out_channels]


class SkippedTransformer(nn.Module):
    """A Transformer2DModel removed by depth pruning: the identity, in the caller's output type."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        if not return_dict:
            return (hidden_states,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=hidden_states)


class SkippedTransformerBlock(nn.Module):
    """A residual ``BasicTransformerBlock`` removed by depth pruning (inside a multi-block
    ``Transformer2DModel``, as in SDXL): the identity on its hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states


class ZeroWidthResnet(nn.Module):
    """A ResBlock whose every channel group was pruned: ``(shortcut(x) + conv2.bias) / scale``."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.conv_shortcut = resnet.conv_shortcut
        self.bias = nn.Parameter(resnet.conv2.bias.detach().clone(), requires_grad=resnet.conv2.bias.requires_grad)
        self.output_scale_factor = resnet.output_scale_factor
        self.out_channels = resnet.out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs):
        x = input_tensor
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x.contiguous())
        return (x + self.bias.view(1, -1, 1, 1)) / self.output_scale_factor


class ConstantOutput(nn.Module):
    """An attention or feed-forward layer whose every head / channel was pruned.

    With no unit left, the output projection sees zeros and returns its bias; this module returns
    that bias (broadcast over the tokens), honouring the attention's residual and rescale options.
    """

    def __init__(self, out_linear: nn.Linear, rescale: float = 1.0, residual: bool = False):
        super().__init__()
        out = out_linear.out_features
        b = out_linear.bias
        self.bias = nn.Parameter(
            b.detach().clone() if b is not None else torch.zeros(out, device=out_linear.weight.device,
                                                                 dtype=out_linear.weight.dtype),
            requires_grad=out_linear.weight.requires_grad,
        )
        self.rescale = rescale
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.bias.expand(*hidden_states.shape[:-1], self.bias.shape[0])
        if self.residual:
            out = out + hidden_states
        return out / self.rescale


# ---------------------------------------------------------------------------- slicers
def _channels(keep_units: list[int], unit_width: int, device: torch.device) -> torch.Tensor:
    idx = [u * unit_width + c for u in keep_units for c in range(unit_width)]
    return torch.tensor(idx, dtype=torch.long, device=device)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = old.weight
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, device="meta")
    new.weight = _param(w, old.weight)
    if old.bias is not None:
        new.bias = _param(old.bias if rows is None else old.bias.index_select(0, rows), old.bias)
    return new


def _slice_conv(old: nn.Conv2d, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Conv2d:
    if old.groups != 1:
        raise ValueError(f"grouped convolution (groups={old.groups}) can not be sliced")
    w = old.weight
    if rows is not None:
        w = w.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Conv2d(w.shape[1], w.shape[0], old.kernel_size, stride=old.stride, padding=old.padding,
                    dilation=old.dilation, bias=old.bias is not None, padding_mode=old.padding_mode,
                    device="meta")
    new.weight = _param(w, old.weight)
    if old.bias is not None:
        new.bias = _param(old.bias if rows is None else old.bias.index_select(0, rows), old.bias)
    return new


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def slice_resnet(resnet: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep whole GroupNorm groups of a ResBlock's inner width; returns the (possibly new) module."""
    if not keep:
        return ZeroWidthResnet(resnet)
    ch = _channels(keep, unit_width, resnet.conv1.weight.device)
    resnet.conv1 = _slice_conv(resnet.conv1, rows=ch)
    if resnet.time_emb_proj is not None:
        rows = ch
        if resnet.time_embedding_norm == "scale_shift":  # the projection holds scale and shift
            rows = torch.cat([ch, ch + resnet.time_emb_proj.out_features // 2])
        resnet.time_emb_proj = _slice_linear(resnet.time_emb_proj, rows=rows)
    old = resnet.norm2
    norm = nn.GroupNorm(len(keep), len(ch), eps=old.eps, affine=old.affine, device="meta")
    if old.affine:
        norm.weight = _param(old.weight.index_select(0, ch), old.weight)
        norm.bias = _param(old.bias.index_select(0, ch), old.bias)
    resnet.norm2 = norm
    resnet.conv2 = _slice_conv(resnet.conv2, cols=ch)
    return resnet


def slice_attention(attn: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep whole heads of a diffusers ``Attention``; derived attributes are updated."""
    if not keep:
        return ConstantOutput(attn.to_out[0], rescale=attn.rescale_output_factor, residual=attn.residual_connection)
    ch = _channels(keep, unit_width, attn.to_q.weight.device)
    attn.to_q = _slice_linear(attn.to_q, rows=ch)
    attn.to_k = _slice_linear(attn.to_k, rows=ch)
    attn.to_v = _slice_linear(attn.to_v, rows=ch)
    attn.to_out[0] = _slice_linear(attn.to_out[0], cols=ch)
    attn.heads = len(keep)
    attn.sliceable_head_dim = len(keep)
    attn.inner_dim = len(ch)
    attn.inner_kv_dim = len(ch)
    return attn


def slice_ffn(ff: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep groups of GEGLU inner channels: rows in both halves of ``proj``, columns of the output."""
    out = ff.net[2]
    if not keep:
        return ConstantOutput(out)
    proj = ff.net[0].proj
    inner = out.in_features
    ch = _channels(keep, unit_width, proj.weight.device)
    # GEGLU's projection holds the value and gate halves; a plain GELU projection only one
    rows = torch.cat([ch, ch + inner]) if proj.out_features == 2 * inner else ch
    ff.net[0].proj = _slice_linear(proj, rows=rows)
    ff.net[2] = _slice_linear(out, cols=ch)
    return ff
