"""Multiply-accumulates (MACs) of a denoiser and of any architecture vector, analytic and counted.

Convention (DESIGN.md §3): one denoiser forward, batch 1, ``text_len`` text tokens, MACs =
FLOPs/2, counting convolutions, linear layers and attention matmuls (cross-attention keys have the
text length; joint attention runs over image + text tokens); norms and element-wise operations
are excluded. The dummy inputs and the forward are the backbone adapter's; which layers a unit
owns is its :meth:`~aptp.engine.backbones.base.Backbone.unit_cost`.

*Analytic* MACs are an exact polynomial of the architecture vector, linear in each entry::

    MACs(v) = c0 + Σ_i coef_i · v_i · Π_{d ∈ gates(i)} u_d

where ``coef_i`` is the MACs of width unit ``i`` (every conv/linear row or column and attention
matmul it owns) or, at a depth entry, the fixed MACs of that depth block (its layers not tied to a
width unit), ``gates(i)`` the depth units enclosing entry ``i`` (none, one, or — for an inner
transformer block of SDXL inside a skippable ``Transformer2DModel`` — a chain of two), and ``c0``
everything else. With at most one enclosing gate (SD 1.x / 2.x) this is the bilinear model of the
paper. The coefficients come from the layer shapes recorded in one forward pass on the *meta*
device, so the function is differentiable in soft vectors (for the resource loss) and cheap.

*Counted* MACs run ``torch.utils.flop_counter.FlopCounterMode`` over a model on the meta device
(on real CPU tensors torch charges the SDPA kernel 0 FLOPs). Tests check both agree.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aptp.engine.space import ArchSpace


def meta_clone(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` on the meta device, without copying any weight data."""
    memo: dict[int, torch.Tensor] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _latent_hw(latent_size: int | tuple[int, int]) -> tuple[int, int]:
    return (latent_size, latent_size) if isinstance(latent_size, int) else tuple(latent_size)


def _dummy_inputs(model: nn.Module, latent_size: int | tuple[int, int], text_len: int, batch: int = 1):
    """(sample, timestep, Conditioning) on the meta device, as the model's backbone builds them."""
    from aptp.engine.backbones import backbone_for

    return backbone_for(model).dummy_inputs(model.config, _latent_hw(latent_size), text_len, batch)


def _forward(model: nn.Module, sample, t, cond):
    from aptp.engine.backbones import backbone_for

    return backbone_for(model).forward(model, sample, t, cond)


def count_macs(unet: nn.Module, latent_size: int | tuple[int, int], text_len: int = 77,
               by_op: bool = False) -> float | dict[str, float]:
    """Counted MACs of one forward (batch 1) with ``FlopCounterMode`` on a meta copy.

    Returns the total, or with ``by_op`` a dict ``{"conv": .., "linear": .., "attention": .., "total": ..}``.
    """
    model = meta_clone(unet)
    sample, t, cond = _dummy_inputs(model, latent_size, text_len)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _forward(model, sample, t, cond)
    total = counter.get_total_flops() / 2
    if not by_op:
        return float(total)
    ops = {str(k): v / 2 for k, v in counter.get_flop_counts()["Global"].items()}
    conv = sum(v for k, v in ops.items() if "convolution" in k)
    attn = sum(v for k, v in ops.items() if "bmm" in k or "scaled_dot_product" in k)
    linear = total - conv - attn
    return {"conv": conv, "linear": linear, "attention": attn, "total": float(total)}


@dataclass
class MacsModel:
    """Analytic MACs of an architecture space at one latent size and text length.

    Attributes:
        c0: MACs outside every unit and every depth block.
        unit_macs: (D,) MACs of each width unit (0 at depth entries).
        depth_of: (D,) vector index of the innermost depth unit enclosing each entry, or -1
            (at a depth entry: the depth unit enclosing that block, -1 unless nested).
        depth_pos: (K,) vector indices of the depth units.
        depth_const: (K,) fixed MACs of each depth block (its layers not tied to a width unit).
        full: MACs of the whole model (all ones).
    """

    c0: float
    unit_macs: torch.Tensor
    depth_of: torch.Tensor
    depth_pos: torch.Tensor
    depth_const: torch.Tensor
    latent_size: tuple[int, int]
    text_len: int

    @property
    def full(self) -> float:
        return float(self(torch.ones(1, self.unit_macs.numel(), dtype=torch.float64))[0])

    def _chain(self) -> list[torch.Tensor]:
        """Ancestor indices per nesting level: level 0 = ``depth_of``, level 1 = its parent, ..."""
        levels, idx = [], self.depth_of
        while bool((idx >= 0).any()):
            levels.append(idx)
            idx = torch.where(idx >= 0, self.depth_of[idx.clamp_min(0)], idx)
        return levels

    def coefficients(self) -> torch.Tensor:
        """(D,) MACs of each entry when it and every gate around it are 1 (width and depth)."""
        coef = self.unit_macs.clone()
        if self.depth_pos.numel():
            coef[self.depth_pos] = coef[self.depth_pos] + self.depth_const.to(coef)
        return coef

    def multipliers(self, v: torch.Tensor) -> torch.Tensor:
        """(B, D) product of the depth gates enclosing each entry (1 outside depth blocks)."""
        mult = torch.ones_like(v)
        for idx in self._chain():
            has = idx >= 0
            gate = torch.ones_like(v)
            gate[:, has] = v[:, idx[has]]
            mult = mult * gate
        return mult

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """MACs of each architecture vector in a (B, D) or (D,) batch; differentiable."""
        v = vector if vector.ndim == 2 else vector.unsqueeze(0)
        if v.shape[-1] != self.unit_macs.numel():
            raise ValueError(f"architecture vector has {v.shape[-1]} entries, the space has {self.unit_macs.numel()}")
        coef = self.coefficients().to(v)
        return self.c0 + (v * coef * self.multipliers(v)).sum(-1)

    def ratio(self, vector: torch.Tensor) -> torch.Tensor:
        """MACs of ``vector`` as a fraction of the full model's."""
        return self(vector) / self.full

    def block_macs(self, space: ArchSpace, vector: torch.Tensor) -> dict[str, float]:
        """Variable MACs (units and depth blocks; not ``c0``) per top-level block, for one vector."""
        v = space.check_vector(vector.detach().double().cpu())
        per_entry = (v * self.coefficients().double() * self.multipliers(v))[0]
        out: dict[str, float] = {}
        for seg in space.segments:
            out[seg.block] = out.get(seg.block, 0.0) + float(per_entry[seg.offset : seg.stop].sum())
        return out


def _record_shapes(unet: nn.Module, latent_size, text_len: int) -> tuple[dict[str, float], dict[str, tuple]]:
    """One meta forward; MACs of every Conv2d / Linear and (N, M) lengths of every Attention."""
    leaf: dict[str, float] = {}
    attn_len: dict[str, tuple[int, int, int]] = {}
    handles = []
    for name, mod in unet.named_modules():
        if isinstance(mod, nn.Conv2d):
            def conv_hook(m, args, out, name=name):
                k = m.kernel_size[0] * m.kernel_size[1]
                leaf[name] = leaf.get(name, 0.0) + out.numel() * (m.in_channels // m.groups) * k
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            def lin_hook(m, args, out, name=name):
                leaf[name] = leaf.get(name, 0.0) + (out.numel() // m.out_features) * m.in_features * m.out_features
            handles.append(mod.register_forward_hook(lin_hook))
        elif hasattr(mod, "to_q") and hasattr(mod, "heads"):  # a diffusers attention module
            def attn_hook(m, args, kwargs, out, name=name):
                x = args[0] if args else kwargs["hidden_states"]
                ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                b, n = x.shape[0], (x.shape[1] if x.ndim == 3 else x.shape[2] * x.shape[3])
                if ctx is None:
                    mlen = n
                elif getattr(m, "add_k_proj", None) is not None:  # joint attention over both streams
                    n = mlen = n + ctx.shape[1]
                else:
                    mlen = ctx.shape[1]
                attn_len[name] = (b, n, mlen)
            handles.append(mod.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        sample, t, cond = _dummy_inputs(unet, latent_size, text_len)
        with torch.no_grad():
            _forward(unet, sample, t, cond)
    finally:
        for h in handles:
            h.remove()
    return leaf, attn_len


def build_macs_model(unet: nn.Module, space: ArchSpace, latent_size: int | tuple[int, int],
                     text_len: int = 77, include_attention: bool = True) -> MacsModel:
    """Derive the analytic MACs function of ``space`` for the (unpruned) ``unet`` (any backbone).

    Args:
        unet: the full model (any device; a meta structural copy of its config is used).
        space: its architecture space.
        latent_size: latent height/width (the image size divided by the VAE's scale factor).
        text_len: text tokens seen by cross-attention.
        include_attention: count the attention matmuls (False gives the conv + linear only
            convention of BK-SDM).
    """
    from aptp.engine.backbones import backbone_for

    backbone = backbone_for(unet)
    model = backbone.build(dict(unet.config), "meta")
    leaf, attn_len = _record_shapes(model, latent_size, text_len)
    claimed: set[str] = set()
    D = space.size
    unit_macs = torch.zeros(D, dtype=torch.float64)
    depth_of = torch.full((D,), -1, dtype=torch.long)
    depth_segments = [s for s in space.segments if s.kind == "depth"]
    depth_pos = torch.tensor([s.offset for s in depth_segments], dtype=torch.long)
    depth_const = torch.zeros(len(depth_segments), dtype=torch.float64)

    def take(name: str) -> float:
        claimed.add(name)
        return leaf[name]

    for seg in space.segments:
        if seg.kind == "depth":
            continue
        cost = backbone.unit_cost(model, seg)
        per_channel = sum(take(name) / channels for name, channels in cost.layers)
        if include_attention and cost.attention is not None:
            b, n, m = attn_len[cost.attention]
            per_channel += 2 * b * n * m  # QKᵀ and AV, per channel of the heads' inner width
        unit_macs[seg.offset : seg.stop] = per_channel * seg.unit_width
    for seg in space.segments:
        if seg.depth_segment >= 0:
            depth_of[seg.offset : seg.stop] = space.segments[seg.depth_segment].offset
    # a layer no unit owns belongs to the innermost depth block containing it, else to c0
    by_length = sorted(range(len(depth_segments)), key=lambda k: -len(depth_segments[k].module))
    c0 = 0.0
    for name, macs in leaf.items():
        if name in claimed:
            continue
        for k in by_length:
            if name.startswith(depth_segments[k].module + "."):
                depth_const[k] += macs
                break
        else:
            c0 += macs
    h, w = (latent_size, latent_size) if isinstance(latent_size, int) else latent_size
    return MacsModel(c0=c0, unit_macs=unit_macs, depth_of=depth_of, depth_pos=depth_pos,
                     depth_const=depth_const, latent_size=(h, w), text_len=text_len)


def macs_by_block(unet: nn.Module, latent_size: int | tuple[int, int], text_len: int = 77) -> dict[str, dict[str, float]]:
    """MACs of the full model per top-level block, split into conv / linear / attention matmuls.

    Blocks are the backbone's: for a U-Net ``down_blocks.i``, ``mid_block``, ``up_blocks.i``; for a
    diffusion transformer each transformer block; and ``other`` (input and output layers, time and
    text embeddings).
    """
    from aptp.engine.backbones import backbone_for

    backbone = backbone_for(unet)
    model = backbone.build(dict(unet.config), "meta")
    leaf, attn_len = _record_shapes(model, latent_size, text_len)
    out: dict[str, dict[str, float]] = {}
    block_of = backbone.block_of

    for name, macs in leaf.items():
        kind = "conv" if isinstance(model.get_submodule(name), nn.Conv2d) else "linear"
        d = out.setdefault(block_of(name), {"conv": 0.0, "linear": 0.0, "attention": 0.0})
        d[kind] += macs
    for name, (b, n, m) in attn_len.items():
        inner = model.get_submodule(name).inner_dim
        out.setdefault(block_of(name), {"conv": 0.0, "linear": 0.0, "attention": 0.0})["attention"] += 2 * b * n * m * inner
    return out
