"""The U-Net backbone: diffusers ``UNet2DConditionModel`` of SD 1.x / 2.x and SDXL.

Units (DESIGN.md §3): ResBlock width per GroupNorm group of conv1's output (masked at conv2's
input, after norm2 — GroupNorm turns an all-zero group into its bias); self- and
cross-attention heads (masked at ``to_out[0]``'s input); GEGLU inner channels in groups (masked at
the FFN output linear's input); depth: the last ResBlock and the last ``Transformer2DModel`` of
each down / up block and, in a transformer holding several ``BasicTransformerBlock``s (SDXL),
each residual inner block. A skipped up-block ResBlock passes the hidden state (the first
``out_channels`` of its concatenated input) and drops the skip tensor (App. D.3, Eq. 24).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from aptp.engine import slicers as S
from aptp.engine.backbones.base import Backbone, UnitCost, UnsupportedModelError, depth_unit, get, mix

UNET_KINDS = ("resnet_channels", "self_attn_heads", "cross_attn_heads", "ffn_channels", "depth")
DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


class UnsupportedUNetError(UnsupportedModelError):
    """A U-Net the engine can not gate or slice; the message names what is unsupported."""


def iter_layers(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module, str, bool]]:
    """Yield the U-Net's layers in execution order.

    Yields:
        (path, layer_kind, module, block_path, is_last_of_its_kind) where layer_kind is
        ``"resnet"`` or ``"attention"`` and module is the ResnetBlock2D / Transformer2DModel.
    """
    blocks: list[tuple[str, nn.Module]] = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for path, block in blocks:
        resnets = list(block.resnets)
        attentions = list(getattr(block, "attentions", None) or [])
        if path == "mid_block":  # the mid block runs resnet0, (attn_i, resnet_{i+1})...
            order = [("resnet", 0)]
            for i in range(len(attentions)):
                order += [("attention", i), ("resnet", i + 1)]
        else:
            order = []
            for i in range(len(resnets)):
                order.append(("resnet", i))
                if attentions:
                    order.append(("attention", i))
        for kind, i in order:
            mod = resnets[i] if kind == "resnet" else attentions[i]
            last = i == (len(resnets) - 1 if kind == "resnet" else len(attentions) - 1)
            yield f"{path}.{'resnets' if kind == 'resnet' else 'attentions'}.{i}", kind, mod, path, last


def _is_skippable(path: str, kind: str, module: nn.Module, unet: nn.Module, is_last: bool) -> bool:
    """Depth policy ``paper``: the last ResBlock / transformer of each down or up block, if the
    identity (or, in up blocks, passing the hidden state) has the block's output shape."""
    block = path.split(".resnets")[0].split(".attentions")[0]
    if block == "mid_block" or not is_last:
        return False
    if kind == "attention":
        return True
    if block.startswith("down_blocks"):
        return module.in_channels == module.out_channels
    # up block: the hidden state entering the last resnet is the previous resnet's output
    return len(unet.get_submodule(block).resnets) > 1


def check_unet_config(config, name: str = "the U-Net") -> None:
    """Refuse, before anything is built, a U-Net config the engine can not handle.

    Raises:
        UnsupportedUNetError: one line naming the unsupported part.
    """
    cls = get(config, "_class_name", "UNet2DConditionModel")
    if cls not in (None, "UNet2DConditionModel"):
        from aptp.engine.backbones import supported_classes

        raise UnsupportedUNetError(f"{name}: a {cls} is not supported; aptp prunes {supported_classes()}")

    def refuse(what: str) -> None:
        raise UnsupportedUNetError(f"{name}: {what} is not supported (aptp prunes the SD 1.x / 2.x / SDXL "
                                   f"text-to-image U-Net layout)")

    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for t in get(config, key) or ():
            if t not in allowed:
                refuse(f"{key[:-12]} block type {t!r}")
    if get(config, "mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
        refuse(f"mid block type {get(config, 'mid_block_type')!r}")
    cin, cout = get(config, "in_channels", 4), get(config, "out_channels", 4)
    if cin != cout:
        refuse(f"in_channels={cin} != out_channels={cout} (an inpainting or otherwise extra-input U-Net)")
    if get(config, "addition_embed_type") not in (None, "text_time"):
        refuse(f"addition_embed_type={get(config, 'addition_embed_type')!r}")
    if get(config, "class_embed_type") is not None or get(config, "num_class_embeds") is not None:
        refuse("class conditioning (class_embed_type / num_class_embeds)")
    if get(config, "encoder_hid_dim_type") is not None:
        refuse(f"encoder_hid_dim_type={get(config, 'encoder_hid_dim_type')!r}")
    if get(config, "dual_cross_attention", False):
        refuse("dual_cross_attention")
    only_cross = get(config, "only_cross_attention", False)
    if only_cross is True or (isinstance(only_cross, (list, tuple)) and any(only_cross)):
        refuse("only_cross_attention")
    if get(config, "attention_type", "default") != "default":
        refuse(f"attention_type={get(config, 'attention_type')!r}")


def check_unet(unet: nn.Module) -> None:
    """:func:`check_unet_config` plus the module types the gates and slicers rely on."""
    cfg = getattr(unet, "config", None)
    if cfg is not None:
        check_unet_config(cfg)
    for path, kind, mod, _, _ in iter_layers(unet):
        if kind == "resnet":
            if type(mod).__name__ != "ResnetBlock2D":
                raise UnsupportedUNetError(f"{path}: a {type(mod).__name__} is not supported (ResnetBlock2D only)")
            continue
        if type(mod).__name__ != "Transformer2DModel":
            raise UnsupportedUNetError(f"{path}: a {type(mod).__name__} is not supported (Transformer2DModel only)")
        for t, tb in enumerate(mod.transformer_blocks):
            tpath = f"{path}.transformer_blocks.{t}"
            if type(tb).__name__ != "BasicTransformerBlock":
                raise UnsupportedUNetError(f"{tpath}: a {type(tb).__name__} is not supported (BasicTransformerBlock only)")
            act = type(tb.ff.net[0]).__name__
            if act != "GEGLU":
                raise UnsupportedUNetError(f"{tpath}.ff: a {act} feed-forward is not supported (GEGLU only)")


def attention_segments(tb: nn.Module, tpath: str, block: str, depth: int) -> list[dict]:
    """Head segments of a ``BasicTransformerBlock``'s ``attn1`` / ``attn2`` (U-Net and PixArt)."""
    out = []
    for name, k in (("attn1", "self_attn_heads"), ("attn2", "cross_attn_heads")):
        attn = getattr(tb, name, None)
        if attn is None:
            continue
        out.append(dict(kind=k, module=f"{tpath}.{name}", size=attn.heads, unit_width=attn.inner_dim // attn.heads,
                        block=block, op="heads", depth=depth))
    return out


def ffn_segment(ff: nn.Module, path: str, block: str, depth: int, ffn_groups: int) -> dict:
    """The channel-group segment of a diffusers ``FeedForward`` (GEGLU or GELU)."""
    inner = ff.net[2].in_features
    if inner % ffn_groups:
        raise ValueError(f"{path} has {inner} inner channels, not divisible into ffn_groups={ffn_groups}")
    return dict(kind="ffn_channels", module=path, size=ffn_groups, unit_width=inner // ffn_groups, block=block,
                op="ffn_channels", depth=depth)


def attention_cost(attn: nn.Module, path: str) -> UnitCost:
    """q / k / v rows, ``to_out[0]`` columns and the attention matmuls of a diffusers Attention."""
    inner = attn.inner_dim
    return UnitCost([(f"{path}.to_q", inner), (f"{path}.to_k", inner), (f"{path}.to_v", inner),
                     (f"{path}.to_out.0", inner)], attention=path)


def ffn_cost(ff: nn.Module, path: str) -> UnitCost:
    inner = ff.net[2].in_features
    return UnitCost([(f"{path}.net.0.proj", inner), (f"{path}.net.2", inner)])


def attention_norms(attn: nn.Module) -> torch.Tensor:
    return sum(getattr(attn, n).weight.detach().abs().sum(1) for n in ("to_q", "to_k", "to_v"))


def ffn_norms(ff: nn.Module) -> torch.Tensor:
    proj = ff.net[0].proj.weight.detach().abs().sum(1)
    inner = ff.net[2].in_features
    return proj[:inner] + proj[inner : 2 * inner] if proj.numel() == 2 * inner else proj


def residual_mixer(args: tuple, kwargs: dict, output, u: torch.Tensor):
    """Gate a residual block called as ``block(hidden_states, ...)`` that returns a tensor."""
    inp = args[0] if args else kwargs["hidden_states"]
    return mix(u, output, inp)


class UNetBackbone(Backbone):
    name = "unet"
    classes = ("UNet2DConditionModel",)
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    component = "unet"
    kinds = UNET_KINDS

    def check_config(self, config, name: str) -> None:
        check_unet_config(config, name)

    def check_model(self, model: nn.Module) -> None:
        check_unet(model)

    def segments(self, unet, ffn_groups, depth_policy):
        width: list[dict] = []
        depth: list[dict] = []
        for path, kind, mod, block, last in iter_layers(unet):
            depth_idx = -1
            if _is_skippable(path, kind, mod, unet, last):
                depth_idx = depth_unit(depth, path, block, depth_policy)
            if kind == "resnet":
                groups = mod.norm2.num_groups
                width.append(dict(kind="resnet_channels", module=path, size=groups,
                                  unit_width=mod.conv1.out_channels // groups, block=block,
                                  op="resnet_channels", depth=depth_idx))
                continue
            nested = depth_policy == "paper" and len(mod.transformer_blocks) > 1
            for t, tb in enumerate(mod.transformer_blocks):
                tpath = f"{path}.transformer_blocks.{t}"
                inner_idx = depth_idx
                if nested:  # each residual BasicTransformerBlock can be skipped on its own
                    inner_idx = depth_unit(depth, tpath, block, depth_policy, parent=depth_idx)
                width += attention_segments(tb, tpath, block, inner_idx)
                width.append(ffn_segment(tb.ff, f"{tpath}.ff", block, inner_idx, ffn_groups))
        return width, depth

    def gate_targets(self, unet, seg):
        mod = unet.get_submodule(seg.module)
        if seg.kind == "resnet_channels":
            return [(mod.conv2, 0)]
        if seg.kind.endswith("heads"):
            return [(mod.to_out[0], 0)]
        return [(mod.net[2], 0)]

    def depth_mixer(self, unet, seg):
        mod = unet.get_submodule(seg.module)
        if not hasattr(mod, "conv1"):  # a Transformer2DModel or an inner BasicTransformerBlock
            def transformer_mixer(args, kwargs, output, u):
                inp = args[0] if args else kwargs["hidden_states"]
                if isinstance(output, torch.Tensor):
                    return mix(u, output, inp)
                if isinstance(output, tuple):
                    return (mix(u, output[0], inp),) + tuple(output[1:])
                output.sample = mix(u, output.sample, inp)
                return output
            return transformer_mixer
        out_channels = mod.out_channels

        def resnet_mixer(args, kwargs, output, u):
            inp = args[0] if args else kwargs["input_tensor"]
            if inp.shape[1] != out_channels:
                inp = inp[:, :out_channels]  # up block: keep the hidden state, drop the skip
            return mix(u, output, inp)
        return resnet_mixer

    def unit_cost(self, unet, seg):
        p, mod = seg.module, unet.get_submodule(seg.module)
        if seg.kind == "resnet_channels":
            c = mod.conv1.out_channels
            layers = [(f"{p}.conv1", c), (f"{p}.conv2", mod.conv2.in_channels)]
            if mod.time_emb_proj is not None:
                layers.append((f"{p}.time_emb_proj", c))
            return UnitCost(layers)
        if seg.kind.endswith("heads"):
            return attention_cost(mod, p)
        return ffn_cost(mod, p)

    def dummy_inputs(self, config, latent_size, text_len, batch=1, device="meta"):
        from aptp.models.conditioning import dummy_conditioning

        h, w = latent_size
        sample = torch.zeros(batch, get(config, "in_channels"), h, w, device=device)
        cond = dummy_conditioning(config, batch, text_len, device=device, latent_size=(h, w))
        return sample, torch.ones(batch, device=device), cond

    def forward(self, unet, sample, timestep, cond):
        from aptp.models.conditioning import unet_forward

        return unet_forward(unet, sample, timestep, cond)

    def block_of(self, name):
        parts = name.split(".")
        if parts[0] in ("down_blocks", "up_blocks"):
            return ".".join(parts[:2])
        return "mid_block" if parts[0] == "mid_block" else "other"

    def block_names(self, unet):
        cfg = unet.config
        down = [f"down_blocks.{i}" for i in range(len(cfg["down_block_types"]))]
        up = [f"up_blocks.{i}" for i in range(len(cfg["up_block_types"]))]
        mid = ["mid_block"] if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None else []
        return down + mid + up

    def slicers(self):
        return {"resnet_channels": S.slice_resnet, "heads": S.slice_attention, "ffn_channels": S.slice_ffn}

    def skip_module(self, mod):
        if hasattr(mod, "conv1"):
            return S.SkippedResnet(mod.out_channels)
        if type(mod).__name__ == "BasicTransformerBlock":
            return S.SkippedTransformerBlock()
        return S.SkippedTransformer()

    def unit_norms(self, unet, seg):
        m = unet.get_submodule(seg.module)
        if seg.kind == "resnet_channels":
            return m.conv1.weight.detach().abs().flatten(1).sum(1)  # (C,) filter norms
        if seg.kind.endswith("heads"):
            return attention_norms(m)
        return ffn_norms(m)

    def distill_blocks(self, unet):
        blocks = list(unet.down_blocks)
        if getattr(unet, "mid_block", None) is not None:
            blocks.append(unet.mid_block)
        return blocks + list(unet.up_blocks)

    def encode_prompts(self, pipe, prompts, size, text_len):
        from aptp.models.conditioning import encode_prompts

        return encode_prompts(pipe, prompts, size)
