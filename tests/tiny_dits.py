"""Tiny random diffusion-transformer pipelines (PixArt-α, SD3, Flux), saved to folders, offline.

Each builder writes a complete diffusers pipeline folder that loads back with
``Pipeline.from_pretrained(folder)`` and samples with the stock ``__call__``; nothing is downloaded.
Tokenizers are word-level ``tokenizers`` models over the shapes-world vocabulary wrapped in
``PreTrainedTokenizerFast`` (transformers 5 saves them as ``TokenizersBackend``, which
``model_index.json`` records and ``from_pretrained`` loads back); CLIP-style ones wrap a prompt in
``<bos> … <eos>``, T5-style ones append ``<eos>``.

Every builder returns a :class:`TinyDiT` (and writes the same record to ``tiny_dit.json`` in the
folder) with the pixel size it is called at, the transformer's input shape, the text length and
the keyword arguments that make ``pipe(prompt, **call_kwargs)`` use exactly that text length (the
pipelines' own ``max_sequence_length`` defaults are 120 / 256 / 512 tokens: they also work, only
with longer text).

All VAEs have two blocks, so ``vae_scale_factor`` is 2 (the real ones: 8). Weights are diffusers'
stock init under ``torch.manual_seed(seed)``; ``randomize_std > 0`` re-draws every transformer
parameter from N(0, randomize_std²) (as ``tests.conftest.make_tiny_unet`` does for U-Nets).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["TinyDiT", "word_tokenizer", "make_tiny_pixart_dir", "make_tiny_sd3_dir", "make_tiny_flux_dir"]

# DPMSolverMultistepScheduler of PixArt-alpha/PixArt-XL-2-1024-MS (scheduler/scheduler_config.json).
PIXART_SCHEDULER = dict(algorithm_type="dpmsolver++", beta_end=0.02, beta_schedule="linear", beta_start=0.0001,
                        lower_order_final=True, num_train_timesteps=1000, prediction_type="epsilon", solver_order=2,
                        solver_type="midpoint", steps_offset=0, timestep_spacing="linspace", use_karras_sigmas=False)
# FlowMatchEulerDiscreteScheduler of stable-diffusion-3-medium-diffusers and of FLUX.1-dev.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                      base_shift=0.5, max_image_seq_len=4096, max_shift=1.15)


@dataclass(frozen=True)
class TinyDiT:
    """What a tiny pipeline folder holds and how to call it.

    Attributes:
        path: the pipeline folder.
        pipeline, transformer: diffusers class names.
        height, width: the call size in ``call_kwargs`` (16 px: an 8 × 8 latent, the transformers'
            ``sample_size`` but for PixArt with conditions; any multiple of ``multiple`` up to
            ``max_size`` works too).
        latent_shape: the VAE latent of one image at (height, width), ``(C, h, w)``.
        hidden_states_shape: what the transformer receives for one image (Flux: packed 2×2 tokens).
        text_len: text tokens of ``encoder_hidden_states`` with ``call_kwargs``.
        max_sequence_length: the T5 length passed as ``max_sequence_length``.
        clip_len: the CLIP tokenizers' ``model_max_length`` (0 without CLIP).
        call_kwargs: keyword arguments for ``pipe(prompt, num_inference_steps=.., **call_kwargs)``.
        multiple: height and width must be multiples of this.
        max_size: the largest height / width (SD3's ``pos_embed_max_size``; 0: no limit).
    """

    path: Path
    pipeline: str
    transformer: str
    height: int
    width: int
    latent_shape: tuple[int, ...]
    hidden_states_shape: tuple[int, ...]
    text_len: int
    max_sequence_length: int
    clip_len: int
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    multiple: int = 4
    max_size: int = 0

    def write(self) -> None:
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        (self.path / "tiny_dit.json").write_text(json.dumps(record, indent=2) + "\n")


def word_tokenizer(max_length: int, style: str = "clip"):
    """A word-level fast tokenizer over the shapes vocabulary; returns (tokenizer, vocab size).

    ``style="clip"``: ``<bos> words <eos>`` (the ids CLIPTextConfig gets: bos 2, eos 3, pad 0);
    ``style="t5"``: ``words <eos>`` (T5: pad 0, eos 3). Unknown words map to ``<unk>`` (1).
    ``add_special_tokens=False`` gives the bare words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from aptp.data.shapes import vocabulary

    words = ["<pad>", "<unk>", "<bos>", "<eos>", *vocabulary()]
    ids = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if style == "clip":
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
            special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])])
    elif style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A <eos>", pair="$A <eos> $B <eos>", special_tokens=[("<eos>", ids["<eos>"])])
    else:
        raise ValueError(f"style must be 'clip' or 't5', not {style!r}")
    kw = dict(tokenizer_object=tok, model_max_length=max_length, pad_token="<pad>", unk_token="<unk>",
              eos_token="<eos>", padding_side="right")
    if style == "clip":
        kw["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(**kw), len(words)


def _clip_config(vocab: int, hidden: int, max_len: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=max_len, bos_token_id=2, eos_token_id=3,
                          pad_token_id=0, **extra)


def _t5(vocab: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                   pad_token_id=0, eos_token_id=3, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _vae(latent_channels: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                         norm_num_groups=4, layers_per_block=1, sample_size=16, **kw)


def _randomize(module, std: float, seed: int) -> None:
    """Re-draw every parameter N(0, std²) (0: keep the stock init), so that a wrongly sliced or
    skipped unit changes the output in tests."""
    if std:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + 1)
            for p in module.parameters():
                p.normal_(0, std)


def _save(pipe, path) -> Path:
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def make_tiny_pixart_dir(path, *, num_layers: int = 2, text_len: int = 16, use_additional_conditions: bool = False,
                         attention_head_dim: int | None = None, seed: int = 0,
                         randomize_std: float = 0.0) -> TinyDiT:
    """A tiny ``PixArtAlphaPipeline`` (cross-attention DiT with adaLN-single, learned sigma).

    Transformer: ``PixArtTransformer2DModel``, ``num_layers`` blocks, 4 heads × ``attention_head_dim``
    (default 8: inner 32; 12 with additional conditions, whose embeddings need inner % 3 == 0), patch 2,
    ``sample_size`` 8, in 4 / out 8 channels (ε and σ, as PixArt-α), caption_channels 32.
    Text: T5EncoderModel (d_model 32, 2 layers), T5-style word tokenizer, ``text_len`` tokens
    (``max_sequence_length=text_len``). VAE: 4 latent channels, scale 2; DPMSolverMultistepScheduler
    with PixArt-α's config.

    Shapes at the default 16 × 16 px: latent (4, 8, 8) → 16 patch tokens of 4 × head dim; text
    (text_len, 32), projected by the caption projection to the inner dim.
    Call with ``use_resolution_binning=False`` (the bins are 256–1024 px), which ``call_kwargs``
    holds. ``use_additional_conditions=True`` adds PixArt-α-1024's resolution / aspect-ratio
    embeddings: the pipeline passes them only when the transformer's ``sample_size`` is 128 (as the
    real 1024 model's), so that option sets ``sample_size`` 128 (interpolation scale 2, as
    PixArt-α-1024) and the pipeline must then be called with the explicit 16 px of ``call_kwargs``
    (the transformer interpolates its position embedding to any size).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    head_dim = attention_head_dim or (12 if use_additional_conditions else 8)
    if use_additional_conditions and (4 * head_dim) % 3:
        raise ValueError("the resolution / aspect-ratio embeddings need 4 × attention_head_dim divisible by 3")
    tokenizer, vocab = word_tokenizer(text_len, "t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=4, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
            cross_attention_dim=4 * head_dim, caption_channels=32, sample_size=128 if use_additional_conditions else 8,
            patch_size=2, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6, activation_fn="gelu-approximate", attention_bias=True,
            num_embeds_ada_norm=1000, norm_num_groups=4, use_additional_conditions=use_additional_conditions)
        text_encoder = _t5(vocab, 32)
        vae = _vae(4)
    _randomize(transformer, randomize_std, seed)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER))
    info = TinyDiT(path=_save(pipe, path), pipeline="PixArtAlphaPipeline", transformer="PixArtTransformer2DModel",
                   height=16, width=16, latent_shape=(4, 8, 8), hidden_states_shape=(4, 8, 8), text_len=text_len,
                   max_sequence_length=text_len, clip_len=0,
                   call_kwargs={"height": 16, "width": 16, "max_sequence_length": text_len,
                                "use_resolution_binning": False, "clean_caption": False},
                   multiple=4)
    info.write()
    return info


def make_tiny_sd3_dir(path, *, num_layers: int = 3, clip_len: int = 16, t5_len: int = 16, seed: int = 0,
                      randomize_std: float = 0.0) -> TinyDiT:
    """A tiny ``StableDiffusion3Pipeline`` (MMDiT, rectified flow).

    Transformer: ``SD3Transformer2DModel``, ``num_layers`` joint blocks (the last one
    ``context_pre_only``), 4 heads × 8 (inner 32 = caption_projection_dim), patch 2,
    ``sample_size`` 8, 16 in / out channels, ``pos_embed_max_size`` 16 (≤ 64 px),
    joint_attention_dim 48, pooled_projection_dim 32.
    Text: two CLIPTextModelWithProjection (hidden 16, projection 16: pooled 16 + 16 = 32; hidden
    states 16 + 16 = 32, zero-padded to T5's 48 as SD3 pads 2048 to 4096) with ``clip_len``-token
    CLIP-style tokenizers, and a T5EncoderModel (d_model 48) with ``t5_len`` tokens
    (``max_sequence_length=t5_len``). VAE: 16 latent channels, SD3's scaling 1.5305 / shift 0.0609;
    FlowMatchEulerDiscreteScheduler(shift=3).

    Shapes at 16 × 16 px: latent (16, 8, 8) → 16 patch tokens; text (clip_len + t5_len, 48) =
    (32, 48) by default (real SD3: 77 + 256 = 333 × 4096); pooled (32,).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    if num_layers < 3:
        raise ValueError("num_layers must be ≥ 3 (first, middle and the context_pre_only last block)")
    tokenizer, vocab = word_tokenizer(clip_len, "clip")
    tokenizer_2, _ = word_tokenizer(clip_len, "clip")
    tokenizer_3, _ = word_tokenizer(t5_len, "t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=32,
            out_channels=16, pos_embed_max_size=16)
        te1 = CLIPTextModelWithProjection(_clip_config(vocab, 16, clip_len, projection_dim=16))
        te2 = CLIPTextModelWithProjection(_clip_config(vocab, 16, clip_len, projection_dim=16))
        te3 = _t5(vocab, 48)
        vae = _vae(16, scaling_factor=1.5305, shift_factor=0.0609)
    _randomize(transformer, randomize_std, seed)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
                                    vae=vae, text_encoder=te1, tokenizer=tokenizer, text_encoder_2=te2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=te3, tokenizer_3=tokenizer_3)
    info = TinyDiT(path=_save(pipe, path), pipeline="StableDiffusion3Pipeline", transformer="SD3Transformer2DModel",
                   height=16, width=16, latent_shape=(16, 8, 8), hidden_states_shape=(16, 8, 8),
                   text_len=clip_len + t5_len, max_sequence_length=t5_len, clip_len=clip_len,
                   call_kwargs={"height": 16, "width": 16, "max_sequence_length": t5_len},
                   multiple=4, max_size=64)
    info.write()
    return info


def make_tiny_flux_dir(path, *, num_layers: int = 2, num_single_layers: int = 2, clip_len: int = 16,
                       t5_len: int = 16, seed: int = 0, randomize_std: float = 0.0) -> TinyDiT:
    """A tiny ``FluxPipeline`` (MMDiT double blocks + single-stream blocks, rectified flow, guidance-distilled).

    Transformer: ``FluxTransformer2DModel``, ``num_layers`` double and ``num_single_layers`` single
    blocks, 4 heads × 8 (inner 32), ``axes_dims_rope`` (2, 2, 4) (sums to the head dim),
    in_channels 64 (16 latent channels packed 2×2), joint_attention_dim 32, pooled_projection_dim 16,
    guidance_embeds True. Text: CLIPTextModel (hidden 16, pooled only) with a ``clip_len``-token
    tokenizer and a T5EncoderModel (d_model 32) with ``t5_len`` tokens (``max_sequence_length``).
    VAE: 16 latent channels, Flux's scaling 0.3611 / shift 0.1159; FlowMatchEulerDiscreteScheduler
    with FLUX.1-dev's dynamic shifting.

    Shapes at 16 × 16 px: latent (16, 8, 8) → packed (16 tokens, 64) with img_ids (16, 3); text
    (t5_len, 32) with txt_ids (t5_len, 3); pooled (16,); guidance (1,). Flux's default size is
    1024 px (``default_sample_size`` is fixed at 128), so height / width must be passed
    (``call_kwargs`` holds them); sizes are multiples of 4 (VAE 2 × packing 2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, vocab = word_tokenizer(clip_len, "clip")
    tokenizer_2, _ = word_tokenizer(t5_len, "t5")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=True, axes_dims_rope=(2, 2, 4))
        te1 = CLIPTextModel(_clip_config(vocab, 16, clip_len))
        te2 = _t5(vocab, 32)
        vae = _vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    _randomize(transformer, randomize_std, seed)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae, text_encoder=te1,
                        tokenizer=tokenizer, text_encoder_2=te2, tokenizer_2=tokenizer_2, transformer=transformer)
    info = TinyDiT(path=_save(pipe, path), pipeline="FluxPipeline", transformer="FluxTransformer2DModel",
                   height=16, width=16, latent_shape=(16, 8, 8), hidden_states_shape=(16, 64), text_len=t5_len,
                   max_sequence_length=t5_len, clip_len=clip_len,
                   call_kwargs={"height": 16, "width": 16, "max_sequence_length": t5_len},
                   multiple=4)
    info.write()
    return info
