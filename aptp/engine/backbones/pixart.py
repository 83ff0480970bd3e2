"""The cross-attention DiT backbone: diffusers ``PixArtTransformer2DModel`` (PixArt-α, PixArt-Σ).

Every transformer block is a stock ``BasicTransformerBlock`` with adaLN-single modulation:
self-attention, cross-attention to the T5 tokens, and a GELU feed-forward, each added to the
residual stream. Units:

- ``self_attn_heads`` / ``cross_attn_heads``: heads of ``attn1`` / ``attn2``, masked at the input
  of ``to_out[0]`` (as in the U-Net);
- ``ffn_channels``: groups of the GELU inner channels, masked at the input of ``ff.net[2]``;
- ``depth``: every transformer block (each is residual, so a skipped block is the identity on its
  hidden states; TinyFusion prunes exactly these).

The patch embedding, the adaLN-single timestep / size embedding, the caption projection and the
output projection are kept whole. PixArt-α predicts a learned variance in the second half of its
output channels; :meth:`PixArtBackbone.forward` returns the noise / velocity half, which is what
training and distillation compare (the pipelines drop the other half when sampling).
"""

from __future__ import annotations

import torch

from aptp.engine import slicers as S
from aptp.engine.backbones.base import Backbone, UnitCost, UnsupportedModelError, depth_unit, get
from aptp.engine.backbones.unet import (attention_cost, attention_norms, attention_segments, ffn_cost, ffn_norms,
                                        ffn_segment, residual_mixer)

# text tokens each pipeline encodes (its ``max_sequence_length`` default)
_PIPELINE_TEXT_LEN = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def _uses_size_conditions(config) -> bool:
    """PixArt-α 1024 embeds the image resolution and aspect ratio (``use_additional_conditions``,
    by default on exactly when ``sample_size`` is 128)."""
    flag = get(config, "use_additional_conditions")
    return bool(flag) if flag is not None else get(config, "sample_size") == 128


class PixArtBackbone(Backbone):
    name = "pixart"
    classes = ("PixArtTransformer2DModel",)
    pipelines = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    component = "transformer"
    kinds = ("self_attn_heads", "cross_attn_heads", "ffn_channels", "depth")
    default_text_len = 120

    def check_config(self, config, name):
        def refuse(what):
            raise UnsupportedModelError(f"{name}: {what} is not supported (aptp prunes the PixArt-α / Σ "
                                        f"transformer layout)")
        if get(config, "norm_type", "ada_norm_single") != "ada_norm_single":
            refuse(f"norm_type={get(config, 'norm_type')!r}")
        if get(config, "num_vector_embeds") is not None:
            refuse("discrete (vector-embedded) inputs")
        if get(config, "only_cross_attention", False) or get(config, "double_self_attention", False):
            refuse("only_cross_attention / double_self_attention")
        if get(config, "activation_fn", "gelu-approximate") not in ("gelu", "gelu-approximate"):
            refuse(f"activation_fn={get(config, 'activation_fn')!r}")
        if get(config, "caption_channels") is None:
            refuse("a transformer without caption_channels (text conditioning)")

    def check_model(self, model):
        self.check_config(model.config, type(model).__name__)
        for i, b in enumerate(model.transformer_blocks):
            if type(b).__name__ != "BasicTransformerBlock":
                raise UnsupportedModelError(f"transformer_blocks.{i}: a {type(b).__name__} is not supported")

    # ------------------------------------------------------------------ units
    def segments(self, model, ffn_groups, depth_policy):
        width, depth = [], []
        for i, tb in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            d = depth_unit(depth, path, path, depth_policy)
            width += attention_segments(tb, path, path, d)
            width.append(ffn_segment(tb.ff, f"{path}.ff", path, d, ffn_groups))
        return width, depth

    def gate_targets(self, model, seg):
        mod = model.get_submodule(seg.module)
        return [(mod.to_out[0], 0)] if seg.kind.endswith("heads") else [(mod.net[2], 0)]

    def depth_mixer(self, model, seg):
        return residual_mixer

    # ------------------------------------------------------------------ MACs
    def unit_cost(self, model, seg) -> UnitCost:
        mod = model.get_submodule(seg.module)
        return attention_cost(mod, seg.module) if seg.kind.endswith("heads") else ffn_cost(mod, seg.module)

    def dummy_inputs(self, config, latent_size, text_len, batch=1, device="meta"):
        from aptp.models.conditioning import Conditioning

        h, w = latent_size
        sample = torch.zeros(batch, get(config, "in_channels"), h, w, device=device)
        text = torch.zeros(batch, text_len, get(config, "caption_channels"), device=device)
        added = None
        if _uses_size_conditions(config):
            s = self._vae_scale
            added = {"resolution": torch.tensor([[h * s, w * s]], dtype=torch.float32, device=device).repeat(batch, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=torch.float32, device=device).repeat(batch, 1)}
        mask = torch.ones(batch, text_len, device=device, dtype=torch.long)
        return sample, torch.ones(batch, device=device), Conditioning(text, added, {"encoder_attention_mask": mask})

    _vae_scale = 8  # PixArt's VAE (SD's); only the size embedding's input value depends on it

    def forward(self, model, sample, timestep, cond):
        extra = cond.extra or {}
        added = cond.added_cond_kwargs or {"resolution": None, "aspect_ratio": None}
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        out = model(sample, encoder_hidden_states=cond.encoder_hidden_states, timestep=timestep,
                    added_cond_kwargs=added, encoder_attention_mask=extra.get("encoder_attention_mask")).sample
        c = sample.shape[1]
        return out[:, :c] if out.shape[1] == 2 * c else out  # drop the learned variance

    def block_of(self, name):
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "transformer_blocks" and len(parts) > 1 else "other"

    # ------------------------------------------------------------------ slicing
    def slicers(self):
        return {"heads": S.slice_attention, "ffn_channels": S.slice_ffn}

    def skip_module(self, mod):
        return S.SkippedTransformerBlock()

    def unit_norms(self, model, seg):
        mod = model.get_submodule(seg.module)
        return attention_norms(mod) if seg.kind.endswith("heads") else ffn_norms(mod)

    def distill_blocks(self, model):
        return list(model.transformer_blocks)

    # ------------------------------------------------------------------ pipelines
    def text_len_from(self, pipeline_class, lengths):
        n = _PIPELINE_TEXT_LEN.get(pipeline_class or "", self.default_text_len)
        return min(n, lengths.get("tokenizer", n))

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, size, text_len):
        from aptp.models.conditioning import Conditioning

        device = pipe.transformer.device
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                max_sequence_length=text_len, clean_caption=False)
        added = None
        if _uses_size_conditions(pipe.transformer.config):
            if size is None:
                s = self.native_size(pipe.transformer.config, int(pipe.vae_scale_factor))
                size = (s, s)
            h, w = int(size[0]), int(size[1])
            n = len(prompts)
            added = {"resolution": torch.tensor([[h, w]], dtype=embeds.dtype, device=device).repeat(n, 1),
                     "aspect_ratio": torch.tensor([[h / w]], dtype=embeds.dtype, device=device).repeat(n, 1)}
        return Conditioning(embeds, added, {"encoder_attention_mask": mask})

    def call_kwargs(self, pipe, text_len):
        # the latents are given at the requested size, so no aspect-ratio binning / resizing
        return {"max_sequence_length": text_len, "use_resolution_binning": False, "clean_caption": False}

    def latent_channels(self, config):
        return int(get(config, "in_channels"))
