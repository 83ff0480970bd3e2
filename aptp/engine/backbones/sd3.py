"""The SD3 MMDiT backbone: diffusers ``SD3Transformer2DModel`` (SD3 medium, SD3.5 large / medium).

Every block is a stock ``JointTransformerBlock``: a joint attention over the image and text tokens
(each stream with its own q / k / v and output projections), then one GELU feed-forward per
stream (``ff``, ``ff_context``), all residual. The last block is ``context_pre_only``: its text
stream only feeds the attention's keys / values (no ``to_add_out``, no ``ff_context``) and it
returns ``None`` for the text. SD3.5 medium's first blocks add a second, image-only
self-attention ``attn2`` (dual attention). Units (:mod:`.mmdit`):

- ``joint_attn_heads``: heads of ``attn`` over both streams (masked at ``to_out[0]`` and
  ``to_add_out``);
- ``self_attn_heads``: heads of ``attn2`` where present (masked at its ``to_out[0]``);
- ``ffn_channels``: groups of the GELU inner channels of ``ff`` and of ``ff_context`` (separate
  segments), masked at ``net[2]``;
- ``depth``: every block, gating both streams.

The patch embedding, the timestep / pooled-text embedding, the caption projection and the output
norm / projection are kept whole. The transformer takes the timestep as σ·1000 (what the
pipeline's ``FlowMatchEulerDiscreteScheduler`` gives) and predicts the flow velocity.
"""

from __future__ import annotations

import torch

from aptp.engine import slicers as S
from aptp.engine.backbones import mmdit as M
from aptp.engine.backbones.base import Backbone, UnitCost, UnsupportedModelError, depth_unit, get
from aptp.engine.backbones.unet import attention_cost, attention_norms, ffn_cost, ffn_norms, ffn_segment

CLIP_LEN = 77  # CLIP-L / CLIP-G tokens (the pipeline's tokenizer_max_length)
T5_LEN = 256  # StableDiffusion3Pipeline's default max_sequence_length
QK_NORMS = (None, "layer_norm", "fp32_layer_norm", "rms_norm")  # per head_dim: kept whole when slicing


class SD3Backbone(Backbone):
    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    pipelines = ("StableDiffusion3Pipeline",)
    component = "transformer"
    kinds = (M.JOINT_HEADS, "self_attn_heads", "ffn_channels", "depth")
    default_text_len = CLIP_LEN + T5_LEN

    def check_config(self, config, name):
        qk = get(config, "qk_norm")
        if qk not in QK_NORMS:
            raise UnsupportedModelError(f"{name}: qk_norm={qk!r} is not supported (aptp prunes SD3 / SD3.5 "
                                        f"transformers with per-head or no q/k norms)")

    def check_model(self, model):
        self.check_config(model.config, type(model).__name__)
        for i, b in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            if type(b).__name__ != "JointTransformerBlock":
                raise UnsupportedModelError(f"{path}: a {type(b).__name__} is not supported "
                                            f"(JointTransformerBlock only)")
            for name in ("attn", "attn2"):
                attn = getattr(b, name, None)
                if attn is None:
                    continue
                M.check_not_fused(attn, f"{path}.{name}")
                proc = type(getattr(attn, "processor", None)).__name__
                if proc != "JointAttnProcessor2_0":
                    raise UnsupportedModelError(f"{path}.{name}: a {proc} attention processor is not supported "
                                                f"(JointAttnProcessor2_0 only)")
            for name in ("ff", "ff_context"):
                ff = getattr(b, name, None)
                if ff is not None and type(ff.net[0]).__name__ != "GELU":
                    raise UnsupportedModelError(f"{path}.{name}: a {type(ff.net[0]).__name__} feed-forward is not "
                                                f"supported (GELU only)")

    # ------------------------------------------------------------------ units
    def segments(self, model, ffn_groups, depth_policy):
        width, depth = [], []
        for i, b in enumerate(model.transformer_blocks):
            path = f"transformer_blocks.{i}"
            d = depth_unit(depth, path, path, depth_policy)
            width.append(M.joint_attention_segment(b.attn, f"{path}.attn", path, d))
            if getattr(b, "attn2", None) is not None:
                a2 = b.attn2
                width.append(dict(kind="self_attn_heads", module=f"{path}.attn2", size=a2.heads,
                                  unit_width=a2.inner_dim // a2.heads, block=path, op="heads", depth=d))
            width.append(ffn_segment(b.ff, f"{path}.ff", path, d, ffn_groups))
            if getattr(b, "ff_context", None) is not None:
                width.append(ffn_segment(b.ff_context, f"{path}.ff_context", path, d, ffn_groups))
        return width, depth

    def gate_targets(self, model, seg):
        mod = model.get_submodule(seg.module)
        if seg.kind == M.JOINT_HEADS:
            return M.joint_gate_targets(mod)
        if seg.kind == "self_attn_heads":
            return [(mod.to_out[0], 0)]
        return [(mod.net[2], 0)]

    def depth_mixer(self, model, seg):
        return M.joint_mixer

    # ------------------------------------------------------------------ MACs
    def unit_cost(self, model, seg) -> UnitCost:
        mod = model.get_submodule(seg.module)
        if seg.kind == M.JOINT_HEADS:
            return M.joint_attention_cost(mod, seg.module)
        if seg.kind == "self_attn_heads":
            return attention_cost(mod, seg.module)
        return ffn_cost(mod, seg.module)

    def dummy_inputs(self, config, latent_size, text_len, batch=1, device="meta"):
        from aptp.models.conditioning import Conditioning

        h, w = latent_size
        sample = torch.zeros(batch, get(config, "in_channels", 16), h, w, device=device)
        text = torch.zeros(batch, text_len, get(config, "joint_attention_dim", 4096), device=device)
        pooled = torch.zeros(batch, get(config, "pooled_projection_dim", 2048), device=device)
        return sample, torch.ones(batch, device=device), Conditioning(text, None, {"pooled_projections": pooled})

    def forward(self, model, sample, timestep, cond):
        extra = cond.extra or {}
        if timestep.ndim == 0:
            timestep = timestep.expand(sample.shape[0])
        return model(hidden_states=sample, encoder_hidden_states=cond.encoder_hidden_states,
                     pooled_projections=extra["pooled_projections"], timestep=timestep).sample

    def block_of(self, name):
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "transformer_blocks" and len(parts) > 1 else "other"

    # ------------------------------------------------------------------ slicing
    def slicers(self):
        return {M.JOINT_OP: M.slice_joint_attention, "heads": S.slice_attention, "ffn_channels": S.slice_ffn}

    def skip_module(self, mod):
        return M.SkippedJointBlock(getattr(mod, "context_pre_only", False))

    # ------------------------------------------------------------------ baselines, distillation
    def unit_norms(self, model, seg):
        mod = model.get_submodule(seg.module)
        if seg.kind == M.JOINT_HEADS:
            return M.joint_attention_norms(mod)
        if seg.kind == "self_attn_heads":
            return attention_norms(mod)
        return ffn_norms(mod)

    def distill_blocks(self, model):
        return list(model.transformer_blocks)

    def block_hidden(self, output):
        return output[1]  # (encoder_hidden_states, hidden_states): the image stream

    # ------------------------------------------------------------------ pipelines
    def text_len_from(self, pipeline_class, lengths):
        """CLIP tokens (the first tokenizer's length, 77) + T5 tokens (the pipeline's default
        ``max_sequence_length`` 256, or the T5 tokenizer's length when shorter)."""
        clip = M.valid_length(lengths.get("tokenizer")) or CLIP_LEN
        t5 = M.valid_length(lengths.get("tokenizer_3"))
        return clip + min(T5_LEN, t5 or T5_LEN)

    @staticmethod
    def _clip_len(pipe) -> int:
        return int(getattr(pipe, "tokenizer_max_length", None) or CLIP_LEN)

    def _t5_len(self, pipe, text_len: int) -> int:
        n = int(text_len) - self._clip_len(pipe)
        if n < 1:
            raise ValueError(f"text_len={text_len} leaves no T5 tokens after the {self._clip_len(pipe)} CLIP tokens")
        return n

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, size, text_len):
        from aptp.models.conditioning import Conditioning

        device = pipe.transformer.device
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                  max_sequence_length=self._t5_len(pipe, text_len))
        return Conditioning(embeds, None, {"pooled_projections": pooled.to(embeds.dtype)})

    def call_kwargs(self, pipe, text_len):
        return {"max_sequence_length": self._t5_len(pipe, text_len)}
