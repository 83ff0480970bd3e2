"""The embedded ``toy`` model: a small Stable-Diffusion-2.1-style pipeline for the shapes world.

Everything here is a stock diffusers / transformers / open_clip component; only the sizes are
ours. The toy pipeline is a genuine :class:`diffusers.StableDiffusionPipeline`:

- ``vae``: :class:`~diffusers.AutoencoderKL`, 3 blocks (32/64/64 channels, 1 layer each), so a
  64x64 image becomes a 4x16x16 latent (scale factor 4). Its ``scaling_factor`` is measured on
  data after training (1 / std of the latents), as SD did for its VAE.
- ``tokenizer``: a word-level tokenizer over the shapes vocabulary, built with ``tokenizers``
  and wrapped in :class:`transformers.PreTrainedTokenizerFast`, so the pipeline's
  ``encode_prompt`` (padding to ``model_max_length``, truncation, the empty negative prompt of
  classifier-free guidance) works unchanged.
- ``text_encoder``: :class:`transformers.CLIPTextModel`, hidden size 64, 3 layers.
- ``unet``: :class:`~diffusers.UNet2DConditionModel` with SD 2.1's block topology
  (CrossAttnDownBlock2D x3 + DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D +
  CrossAttnUpBlock2D x3, linear projections, GEGLU), channels 32/64/128/128, 2 layers per
  block, ``attention_head_dim`` [2, 4, 8, 8] read as head *counts* like SD 2.1 (head size 16).
- ``scheduler``: PNDM with SD 2.1's settings (v-prediction); :func:`toy_ddim_config` gives the
  matching DDIM config.

The domain CLIP (``assets/domain-clip``) is an ``open_clip`` model in a ``local-dir`` folder, so
``open_clip.create_model_and_transforms("local-dir:<folder>")`` and
``open_clip.get_tokenizer("local-dir:<folder>")`` load it through open_clip's own code path. It
uses the same word-level tokenizer (with its own context length).

Trained weights are produced by ``python -m aptp.train.toy`` (see ``recipes/toy-*.yaml``) and
exported into ``aptp/models/assets/``.
"""

from __future__ import annotations

import copy
import json
import logging
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aptp.data.shapes import vocabulary
from aptp.errors import ModelNotFoundError

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = [
    "BOS_TOKEN",
    "CLIP_CONTEXT_LENGTH",
    "EOS_TOKEN",
    "MAX_LENGTH",
    "PAD_TOKEN",
    "RESOLUTION",
    "UNK_TOKEN",
    "VAE_SCALE_FACTOR",
    "build_domain_clip",
    "build_text_encoder",
    "build_tokenizer",
    "build_toy_pipeline",
    "build_unet",
    "build_vae",
    "domain_clip_assets_dir",
    "domain_clip_config",
    "load_domain_clip",
    "load_toy_pipeline",
    "save_domain_clip",
    "toy_assets_dir",
    "toy_ddim_config",
    "toy_scheduler_config",
    "toy_text_encoder_config",
    "toy_unet_config",
    "toy_vae_config",
]

RESOLUTION = 64  # image side in pixels
VAE_SCALE_FACTOR = 4  # 2 ** (number of VAE blocks - 1)
LATENT_SIZE = RESOLUTION // VAE_SCALE_FACTOR  # 16

# Special tokens. The end token must not get id 2: transformers' CLIPTextModel treats
# eos_token_id == 2 as a legacy config and pools at argmax(input_ids) instead of at the EOS.
PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"
_SPECIALS = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0..3, words follow

# The longest shapes caption has 13 words, 15 tokens with BOS/EOS; 24 leaves room for user
# prompts a little longer than the grammar's and is still 3x shorter than SD's 77.
MAX_LENGTH = 24
CLIP_CONTEXT_LENGTH = 24

DOMAIN_CLIP_TOKENIZER_NAME = "aptp-shapes-words"  # marker: open_clip then reads the folder's tokenizer

# Initial VAE scaling factor, before one is measured on data after training.
_DEFAULT_SCALING_FACTOR = 1.0


# ----------------------------------------------------------------------------- configs


def toy_vae_config(scaling_factor: float = _DEFAULT_SCALING_FACTOR) -> dict[str, Any]:
    """The toy ``AutoencoderKL`` config: 64 px RGB <-> 4x16x16 latents, about 0.95M parameters.

    Args:
        scaling_factor: Multiplier that brings latents to unit variance (1 / std of the
            latents); the training run measures it and stores it in the saved config.
    """
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        # 8 groups keep 4-8 channels per group at these widths (32 groups would normalise
        # single channels of the 32-channel block).
        "norm_num_groups": 8,
        "sample_size": RESOLUTION,
        "scaling_factor": float(scaling_factor),
    }


def toy_text_encoder_config(vocab_size: int | None = None) -> dict[str, Any]:
    """The toy ``CLIPTextConfig``: hidden 64, 3 layers, 4 heads, ``MAX_LENGTH`` positions."""
    ids = _token_ids()
    return {
        "vocab_size": len(ids) if vocab_size is None else vocab_size,
        "hidden_size": 64,
        "intermediate_size": 256,
        "projection_dim": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_LENGTH,
        "hidden_act": "gelu",  # SD 2.x's OpenCLIP text tower uses GELU (SD 1.x: quick_gelu)
        "pad_token_id": ids[PAD_TOKEN],
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
    }


def toy_unet_config() -> dict[str, Any]:
    """The toy U-Net config: SD 2.1's topology scaled down to about 8.6M parameters.

    Differences from SD 2.1 (``configs/sd2.1-unet.json``) are only sizes: channels
    32/64/128/128 (SD: 320/640/1280/1280), head counts 2/4/8/8 (SD: 5/10/20/20; both are
    passed as ``attention_head_dim`` and read as head counts, head size 16 here, 64 in SD),
    8 GroupNorm groups (SD: 32), cross-attention width 64 (SD: 1024) and 16x16 latents.
    """
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                           "CrossAttnUpBlock2D"],
        "only_cross_attention": False,
        "block_out_channels": [32, 64, 128, 128],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 8,
        "norm_eps": 1e-5,
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4, 8, 8],
        "dual_cross_attention": False,
        "use_linear_projection": True,
        "upcast_attention": True,
        "num_class_embeds": None,
    }


def _toy_noise_schedule() -> dict[str, Any]:
    """SD 2.1's noise schedule and v-prediction, shared by the toy's schedulers."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "set_alpha_to_one": False,
        "prediction_type": "v_prediction",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    }


def toy_scheduler_config() -> dict[str, Any]:
    """PNDM with SD 2.1's settings (its default scheduler), v-prediction."""
    return {**_toy_noise_schedule(), "skip_prk_steps": True}


def toy_ddim_config() -> dict[str, Any]:
    """DDIM with the same noise schedule as :func:`toy_scheduler_config`."""
    return {**_toy_noise_schedule(), "clip_sample": False}


def domain_clip_config() -> dict[str, Any]:
    """The domain CLIP's ``open_clip_config.json`` content (``model_cfg`` + ``preprocess_cfg``).

    A ViT on 64 px images with 8 px patches (64 tokens + CLS) and a causal text transformer over
    the shapes words, pooled at the end token; about 2.2M parameters (1.6M in the image tower).
    """
    ids = _token_ids()
    return {
        "model_cfg": {
            "embed_dim": 128,
            "vision_cfg": {
                "image_size": RESOLUTION,
                "patch_size": 8,
                "width": 160,
                "head_width": 32,
                "layers": 5,
            },
            "text_cfg": {
                "context_length": CLIP_CONTEXT_LENGTH,
                "vocab_size": len(ids),
                # A non-empty name makes open_clip.get_tokenizer("local-dir:...") load an
                # HFTokenizer from the folder itself instead of its BPE SimpleTokenizer (whose
                # 49k-row embedding alone would be 6M parameters).
                "hf_tokenizer_name": DOMAIN_CLIP_TOKENIZER_NAME,
                "width": 128,
                "heads": 4,
                "layers": 3,
                "pad_id": ids[PAD_TOKEN],
                "eos_id": ids[EOS_TOKEN],
                "pool_type": "eos",
            },
        },
        "preprocess_cfg": {
            "size": RESOLUTION,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


# ----------------------------------------------------------------------------- tokenizer


def _words() -> list[str]:
    # The tokenizer lowercases (so "A Red Circle" works); the shapes grammar guarantees that
    # lowercasing its upper-case words ("SUN") collides with no other caption word.
    words = sorted({w.lower() for w in vocabulary()})
    if len(words) != len(vocabulary()):
        raise ValueError("shapes vocabulary has words that differ only in case; the tokenizer lowercases")
    return words


def _token_ids() -> dict[str, int]:
    return {tok: i for i, tok in enumerate([*_SPECIALS, *_words()])}


def build_tokenizer(model_max_length: int = MAX_LENGTH) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the shapes vocabulary that ``StableDiffusionPipeline`` accepts.

    Text is NFKC-normalised and lowercased, split on whitespace and punctuation, and wrapped as
    ``<|startoftext|> words <|endoftext|>``; unknown words map to ``<unk>``, padding uses
    ``<pad>`` (id 0). Decoding joins words with single spaces.

    Args:
        model_max_length: Padded length, BOS and EOS included.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = _token_ids()
    core = Tokenizer(models.WordLevel(vocab=ids, unk_token=UNK_TOKEN))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, ids[BOS_TOKEN]), (EOS_TOKEN, ids[EOS_TOKEN])],
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        model_max_length=model_max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="right",
        truncation_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


# ----------------------------------------------------------------------------- components


def build_vae(scaling_factor: float = _DEFAULT_SCALING_FACTOR) -> AutoencoderKL:
    """A randomly initialised toy VAE (see :func:`toy_vae_config`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**toy_vae_config(scaling_factor))


def build_text_encoder() -> CLIPTextModel:
    """A randomly initialised toy text encoder (see :func:`toy_text_encoder_config`)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**toy_text_encoder_config()))


def build_unet() -> UNet2DConditionModel:
    """A randomly initialised toy U-Net (see :func:`toy_unet_config`)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**toy_unet_config())


def build_toy_pipeline(
    vae: AutoencoderKL | None = None,
    text_encoder: CLIPTextModel | None = None,
    unet: UNet2DConditionModel | None = None,
    scheduler: str = "pndm",
    seed: int | None = 0,
) -> StableDiffusionPipeline:
    """Assemble a toy ``StableDiffusionPipeline``; components not given are randomly initialised.

    Args:
        vae: A trained VAE, or None for a random one.
        text_encoder: A trained text encoder, or None for a random one.
        unet: A trained U-Net, or None for a random one.
        scheduler: ``"pndm"`` (SD's default) or ``"ddim"``.
        seed: Seed for the random initialisation (restores the global RNG afterwards);
            None uses the global RNG as is.

    Returns:
        The pipeline in float32 on the CPU, without safety checker.

    Raises:
        ValueError: For an unknown scheduler name.
    """
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    if scheduler not in ("pndm", "ddim"):
        raise ValueError(f"scheduler {scheduler!r} is not supported; use 'pndm' or 'ddim'")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        vae = build_vae() if vae is None else vae
        text_encoder = build_text_encoder() if text_encoder is None else text_encoder
        unet = build_unet() if unet is None else unet
    sched = (PNDMScheduler(**toy_scheduler_config()) if scheduler == "pndm"
             else DDIMScheduler(**toy_ddim_config()))
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=build_tokenizer(), unet=unet.eval(),
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# ----------------------------------------------------------------------------- shipped assets


def _assets_root() -> Path:
    return Path(str(resources.files("aptp.models"))) / "assets"


def toy_assets_dir() -> Path:
    """The folder of the shipped toy pipeline (a diffusers ``save_pretrained`` folder)."""
    return _assets_root() / "toy"


def domain_clip_assets_dir() -> Path:
    """The folder of the shipped domain CLIP (an open_clip ``local-dir`` folder)."""
    return _assets_root() / "domain-clip"


def _missing_assets(what: str, folder: Path, stage: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"the {what} is not installed at {folder}; train it with "
        f"`python -m aptp.train.toy {stage} --recipe recipes/toy-{stage}.yaml --output runs/toy-{stage}` "
        f"and export it with `python -m aptp.train.toy export ...` (see recipes/toy-teacher.yaml)"
    )


def load_toy_pipeline(dtype: torch.dtype = torch.float32, folder: str | Path | None = None,
                      scheduler: str = "pndm") -> StableDiffusionPipeline:
    """Load the trained toy pipeline offline.

    Args:
        dtype: Dtype of every component (the shipped weights are float16 and are cast).
        folder: A toy pipeline folder; None for the shipped one (:func:`toy_assets_dir`).
        scheduler: ``"pndm"`` (as saved) or ``"ddim"``.

    Raises:
        ModelNotFoundError: If the folder holds no pipeline.
        ValueError: For an unknown scheduler name.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if scheduler not in ("pndm", "ddim"):
        raise ValueError(f"scheduler {scheduler!r} is not supported; use 'pndm' or 'ddim'")
    path = toy_assets_dir() if folder is None else Path(folder)
    if not (path / "model_index.json").is_file():
        raise _missing_assets("toy pipeline", path, "teacher")
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=dtype, local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    )
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_domain_clip(seed: int | None = 0) -> torch.nn.Module:
    """A randomly initialised domain CLIP (``open_clip.CLIP``, see :func:`domain_clip_config`)."""
    import open_clip

    cfg = copy.deepcopy(domain_clip_config()["model_cfg"])
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return open_clip.CLIP(**cfg)


def save_domain_clip(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as an open_clip ``local-dir`` folder: config, safetensors and tokenizer.

    Each file is written atomically; the config is written last, so a folder with an
    ``open_clip_config.json`` is complete.

    Returns:
        The folder.
    """
    from aptp.io import atomic_save_file, atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().clone() for k, v in model.state_dict().items()}
    atomic_save_file(state, folder / "open_clip_model.safetensors", metadata={"format": "pt"})
    tok_dir = folder / ".tokenizer.tmp"
    build_tokenizer(CLIP_CONTEXT_LENGTH).save_pretrained(tok_dir)
    for f in tok_dir.iterdir():
        f.replace(folder / f.name)
    tok_dir.rmdir()
    atomic_write_json(folder / "open_clip_config.json", domain_clip_config())
    return folder


def load_domain_clip(folder: str | Path | None = None, device: str | torch.device = "cpu"):
    """Load the domain CLIP through open_clip's ``local-dir:`` path.

    Args:
        folder: A folder written by :func:`save_domain_clip`; None for the shipped one.
        device: Where to put the model.

    Returns:
        ``(model, preprocess, tokenizer)``: the ``open_clip.CLIP`` model in eval mode and float32,
        the validation image transform (PIL image -> normalised (3, 64, 64) tensor) and an
        open_clip tokenizer (list of str -> LongTensor (B, context_length)).

    Raises:
        ModelNotFoundError: If the folder holds no domain CLIP.
    """
    import open_clip

    path = domain_clip_assets_dir() if folder is None else Path(folder)
    if not (path / "open_clip_config.json").is_file():
        raise _missing_assets("domain CLIP", path, "clip")
    name = f"local-dir:{path.resolve()}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    model = model.float().eval()
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def write_unet_config_json(path: str | Path) -> Path:
    """Write :func:`toy_unet_config` as a diffusers ``config.json`` (for ``aptp/models/configs``)."""
    from aptp.io import atomic_write_text

    cfg = {"_class_name": "UNet2DConditionModel", **toy_unet_config()}
    return atomic_write_text(path, json.dumps(cfg, indent=2) + "\n")
