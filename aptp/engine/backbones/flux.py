"""The Flux MMDiT backbone: diffusers ``FluxTransformer2DModel`` (FLUX.1 [dev] / [schnell]).

Two kinds of stock blocks, all residual:

- double-stream ``FluxTransformerBlock``s, exactly SD3's joint blocks (:mod:`.mmdit`): a joint
  attention (``FluxAttention``: q / k / v and output projection per stream, rotary embeddings over
  the text + image positions) and a GELU feed-forward per stream (``ff``, ``ff_context``);
- single-stream ``FluxSingleTransformerBlock``s over the concatenated text + image tokens: a
  self-attention without output projection (``attn``, ``pre_only``) and a parallel GELU MLP
  (``proj_mlp``), whose outputs are concatenated and projected back by one ``proj_out``
  (input columns ``[0, inner)``: the heads; ``[inner, inner + mlp)``: the MLP channels).

Units:

- ``joint_attn_heads``: heads of every block's ``attn`` (double: masked at ``to_out[0]`` and
  ``to_add_out``; single: masked at ``proj_out``'s first ``inner`` input columns);
- ``ffn_channels``: groups of the GELU inner channels of ``ff`` / ``ff_context`` (masked at
  ``net[2]``) and of a single block's MLP (``proj_mlp`` rows; masked at ``proj_out``'s last ``mlp``
  input columns);
- ``depth``: every double and single block (both take and return ``(encoder_hidden_states,
  hidden_states)``; the depth gate mixes both streams).

The pipeline packs the 16-channel VAE latent into 2×2 patches (64 channels per token) and passes
``timestep / 1000`` (the transformer multiplies by 1000 again) and, for the guidance-distilled
[dev], the guidance scale; :meth:`FluxBackbone.forward` takes the unpacked (B, 16, h, w) latent and
σ·1000 timesteps like every other backbone and does the same.
"""

from __future__ import annotations

import torch
from torch import nn

from aptp.engine import slicers as S
from aptp.engine.backbones import mmdit as M
from aptp.engine.backbones.base import Backbone, UnitCost, UnsupportedModelError, depth_unit, get
from aptp.engine.backbones.unet import ffn_cost, ffn_norms, ffn_segment

T5_LEN = 512  # FluxPipeline's default max_sequence_length
GUIDANCE = 3.5  # FluxPipeline's default guidance_scale
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels; 1024 px)
SINGLE_HEADS_OP = "single_heads"
SINGLE_MLP_OP = "single_mlp"


# ---------------------------------------------------------------------------- latents
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): FluxPipeline._pack_latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2·W/2, 4C) → (B, C, H, W) for a latent of H × W: FluxPipeline._unpack_latents."""
    b, _, ch = tokens.shape
    x = tokens.view(b, height // 2, width // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2·W/2, 3) position ids of the packed tokens of an H × W latent:
    FluxPipeline._prepare_latent_image_ids (row, column in the second and third entry)."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)
    ids[..., 1] = ids[..., 1] + torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


# ---------------------------------------------------------------------------- single blocks
class NoHeads(nn.Module):
    """A single block's attention whose every head was pruned: a zero-width output (its columns of
    ``proj_out`` are gone too)."""

    heads = 0
    inner_dim = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0)


class NoChannels(nn.Module):
    """A single block's ``proj_mlp`` whose every channel was pruned: a zero-width output."""

    out_features = 0

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features

    def forward(self, x: torch.Tensor):
        return x.new_zeros(*x.shape[:-1], 0)


def single_widths(block: nn.Module) -> tuple[int, int]:
    """(attention width, MLP width) of a (possibly sliced) single block: the input columns of
    ``proj_out`` are ``[0, attention)`` then ``[attention, attention + mlp)``."""
    return int(block.attn.inner_dim), int(block.proj_mlp.out_features)


def _slice_proj_out(block: nn.Module, cols: torch.Tensor, attn_w: int, mlp_w: int) -> None:
    out = block.proj_out
    if cols.numel() == 0:
        block.proj_out = S.ConstantOutput(out)
        return
    new = S._slice_linear(out, cols=cols)
    new._tp_packed_row_blocks = [attn_w, mlp_w]
    block.proj_out = new


def slice_single_heads(block: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep whole heads of a single block: q / k / v rows and ``proj_out``'s attention columns
    (offsets from the block's current shapes, so it composes with :func:`slice_single_mlp` in
    either order)."""
    a, m = single_widths(block)
    dev = block.proj_out.weight.device if isinstance(block.proj_out, nn.Linear) else None
    ch = S._channels(keep, unit_width, dev or torch.device("cpu"))
    attn = block.attn
    if keep:
        for name in ("to_q", "to_k", "to_v"):
            setattr(attn, name, S._slice_linear(getattr(attn, name), rows=ch))
        attn.heads = len(keep)
        attn.inner_dim = len(ch)
    else:
        block.attn = NoHeads()
    if isinstance(block.proj_out, nn.Linear):
        cols = torch.cat([ch, a + torch.arange(m, device=ch.device)])
        _slice_proj_out(block, cols, len(ch), m)
    return block


def slice_single_mlp(block: nn.Module, keep: list[int], unit_width: int) -> nn.Module:
    """Keep groups of a single block's MLP channels: ``proj_mlp`` rows and ``proj_out``'s MLP columns."""
    a, m = single_widths(block)
    dev = block.proj_out.weight.device if isinstance(block.proj_out, nn.Linear) else None
    ch = S._channels(keep, unit_width, dev or torch.device("cpu"))
    if keep:
        block.proj_mlp = S._slice_linear(block.proj_mlp, rows=ch)
    else:
        block.proj_mlp = NoChannels(block.proj_mlp.in_features)
    block.mlp_hidden_dim = len(ch)
    if isinstance(block.proj_out, nn.Linear):
        cols = torch.cat([torch.arange(a, device=ch.device), a + ch])
        _slice_proj_out(block, cols, a, len(ch))
    return block


class FluxBackbone(Backbone):
    name = "flux"
    classes = ("FluxTransformer2DModel",)
    pipelines = ("FluxPipeline",)
    component = "transformer"
    kinds = (M.JOINT_HEADS, "ffn_channels", "depth")
    default_text_len = T5_LEN

    def check_config(self, config, name):
        def refuse(what):
            raise UnsupportedModelError(f"{name}: {what} is not supported (aptp prunes the FLUX.1 transformer "
                                        f"layout)")
        if get(config, "patch_size", 1) != 1:
            refuse(f"patch_size={get(config, 'patch_size')} (FluxPipeline packs 2×2 latent patches itself)")
        cin = get(config, "in_channels", 64)
        if cin % 4:
            refuse(f"in_channels={cin} (not 2×2-packed latent channels)")
        cout = get(config, "out_channels")
        if cout not in (None, cin):
            refuse(f"out_channels={cout} != in_channels={cin}")

    def check_model(self, model):
        self.check_config(model.config, type(model).__name__)
        for group, want in (("transformer_blocks", "FluxTransformerBlock"),
                            ("single_transformer_blocks", "FluxSingleTransformerBlock")):
            for i, b in enumerate(getattr(model, group)):
                path = f"{group}.{i}"
                if type(b).__name__ != want:
                    raise UnsupportedModelError(f"{path}: a {type(b).__name__} is not supported ({want} only)")
                M.check_not_fused(b.attn, f"{path}.attn")
                proc = type(getattr(b.attn, "processor", None)).__name__
                if proc != "FluxAttnProcessor":
                    raise UnsupportedModelError(f"{path}.attn: a {proc} attention processor is not supported "
                                                f"(FluxAttnProcessor only)")

    # ------------------------------------------------------------------ units
    def segments(self, model, ffn_groups, depth_policy):
        width, depth = [], []

        for i, b in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            d = depth_unit(depth, path, path, depth_policy)
            width.append(M.joint_attention_segment(b.attn, f"{path}.attn", path, d))
            width.append(ffn_segment(b.ff, f"{path}.ff", path, d, ffn_groups))
            width.append(ffn_segment(b.ff_context, f"{path}.ff_context", path, d, ffn_groups))
        for i, b in enumerate(model.single_transformer_blocks):
            path = f"single_transformer_blocks.{i}"
            d = depth_unit(depth, path, path, depth_policy)
            mlp = b.proj_mlp.out_features
            if mlp % ffn_groups:
                raise ValueError(f"{path} has {mlp} MLP channels, not divisible into ffn_groups={ffn_groups}")
            # both segments live on the block: their slicers edit the attention / MLP and proj_out
            width.append(dict(kind=M.JOINT_HEADS, module=path, size=b.attn.heads, unit_width=b.attn.head_dim,
                              block=path, op=SINGLE_HEADS_OP, depth=d))
            width.append(dict(kind="ffn_channels", module=path, size=ffn_groups, unit_width=mlp // ffn_groups,
                              block=path, op=SINGLE_MLP_OP, depth=d))
        return width, depth

    def gate_targets(self, model, seg):
        mod = model.get_submodule(seg.module)
        if seg.op == SINGLE_HEADS_OP:
            return [(mod.proj_out, 0)]
        if seg.op == SINGLE_MLP_OP:
            return [(mod.proj_out, mod.attn.inner_dim)]
        if seg.kind == M.JOINT_HEADS:
            return M.joint_gate_targets(mod)
        return [(mod.net[2], 0)]

    def depth_mixer(self, model, seg):
        return M.joint_mixer

    # ------------------------------------------------------------------ MACs
    def unit_cost(self, model, seg) -> UnitCost:
        p, mod = seg.module, model.get_submodule(seg.module)
        if seg.op in (SINGLE_HEADS_OP, SINGLE_MLP_OP):
            a, m = single_widths(mod)
            if seg.op == SINGLE_HEADS_OP:
                return UnitCost([(f"{p}.attn.to_q", a), (f"{p}.attn.to_k", a), (f"{p}.attn.to_v", a),
                                 (f"{p}.proj_out", a + m)], attention=f"{p}.attn")
            return UnitCost([(f"{p}.proj_mlp", m), (f"{p}.proj_out", a + m)])
        if seg.kind == M.JOINT_HEADS:
            return M.joint_attention_cost(mod, p)
        return ffn_cost(mod, p)

    def dummy_inputs(self, config, latent_size, text_len, batch=1, device="meta"):
        from aptp.models.conditioning import Conditioning

        h, w = latent_size
        sample = torch.zeros(batch, self.latent_channels(config), h, w, device=device)
        text = torch.zeros(batch, text_len, get(config, "joint_attention_dim", 4096), device=device)
        extra = {"pooled_projections": torch.zeros(batch, get(config, "pooled_projection_dim", 768), device=device)}
        if get(config, "guidance_embeds", False):
            extra["guidance"] = torch.full((batch,), GUIDANCE, device=device)
        return sample, torch.ones(batch, device=device), Conditioning(text, None, extra)

    def forward(self, model, sample, timestep, cond):
        extra = cond.extra or {}
        b, _, h, w = sample.shape
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        config = getattr(getattr(model, "module", model), "config", None)  # DDP
        guidance = extra.get("guidance")
        if config is not None and get(config, "guidance_embeds", False):
            if guidance is None:
                guidance = torch.full((b,), GUIDANCE, device=sample.device, dtype=torch.float32)
        else:
            guidance = None
        text = cond.encoder_hidden_states
        txt_ids = torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype)
        out = model(hidden_states=pack_latents(sample), encoder_hidden_states=text,
                    pooled_projections=extra["pooled_projections"], timestep=timestep / 1000, guidance=guidance,
                    img_ids=latent_image_ids(h, w, sample.device, sample.dtype), txt_ids=txt_ids).sample
        return unpack_latents(out, h, w)

    def block_of(self, name):
        parts = name.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 1:
            return ".".join(parts[:2])
        return "other"

    # ------------------------------------------------------------------ slicing
    def slicers(self):
        return {M.JOINT_OP: M.slice_joint_attention, SINGLE_HEADS_OP: slice_single_heads,
                SINGLE_MLP_OP: slice_single_mlp, "ffn_channels": S.slice_ffn}

    def skip_module(self, mod):
        return M.SkippedJointBlock(False)

    # ------------------------------------------------------------------ baselines, distillation
    def unit_norms(self, model, seg):
        mod = model.get_submodule(seg.module)
        if seg.op == SINGLE_HEADS_OP:
            return sum(getattr(mod.attn, n).weight.detach().abs().sum(1) for n in ("to_q", "to_k", "to_v"))
        if seg.op == SINGLE_MLP_OP:
            return mod.proj_mlp.weight.detach().abs().sum(1)
        if seg.kind == M.JOINT_HEADS:
            return M.joint_attention_norms(mod)
        return ffn_norms(mod)

    def distill_blocks(self, model):
        return list(model.transformer_blocks) + list(model.single_transformer_blocks)

    def block_hidden(self, output):
        return output[1]  # (encoder_hidden_states, hidden_states): the image stream

    # ------------------------------------------------------------------ pipelines
    def latent_channels(self, config):
        return int(get(config, "in_channels", 64)) // 4

    def initial_latents(self, config, seed, height, width, vae_scale_factor):
        """FluxPipeline's packed ``latents=``: drawn unpacked as (1, C, h, w) (h = 2·⌊height / 2s⌋,
        as the pipeline rounds), then packed, so it equals the unpacked draw of the same seed."""
        h = 2 * (int(height) // (vae_scale_factor * 2))
        w = 2 * (int(width) // (vae_scale_factor * 2))
        g = torch.Generator("cpu").manual_seed(seed)
        return pack_latents(torch.randn((1, self.latent_channels(config), h, w), generator=g))

    def native_size(self, config, vae_scale_factor):
        return int(get(config, "sample_size", None) or DEFAULT_SAMPLE_SIZE) * vae_scale_factor

    def text_len_from(self, pipeline_class, lengths):
        """T5 tokens: the pipeline's default ``max_sequence_length`` 512, or the T5 tokenizer's
        length when shorter (the CLIP encoder only gives the pooled embedding)."""
        return min(T5_LEN, M.valid_length(lengths.get("tokenizer_2")) or T5_LEN)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, size, text_len):
        from aptp.models.conditioning import Conditioning

        device = pipe.transformer.device
        embeds, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=device,
                                               num_images_per_prompt=1, max_sequence_length=int(text_len))
        extra = {"pooled_projections": pooled.to(embeds.dtype)}
        if pipe.transformer.config.guidance_embeds:
            g = M.pipeline_default(pipe, "guidance_scale", GUIDANCE)
            extra["guidance"] = torch.full((len(prompts),), float(g), device=device, dtype=torch.float32)
        return Conditioning(embeds, None, extra)

    def call_kwargs(self, pipe, text_len):
        return {"max_sequence_length": int(text_len)}
