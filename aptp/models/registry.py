"""Model registry: ``--model`` accepts an alias, a local diffusers folder, or a hub id.

- An alias names a known model. Its denoiser config (U-Net or transformer) ships with aptp, so
  anything that needs only the architecture (units, MACs) works offline on the meta device; its
  weights come from the Hugging Face hub or cache like any hub id.
- A local folder is a diffusers pipeline folder (``model_index.json`` + ``unet/`` or
  ``transformer/`` ...) or a bare denoiser folder (``config.json`` of a ``UNet2DConditionModel``,
  ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` or ``FluxTransformer2DModel``).
- A hub id (``owner/name``) is loaded with diffusers; with ``HF_HUB_OFFLINE=1`` or
  ``model.local_files_only`` only the local HF cache is used.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from aptp.engine.backbones import backbone_for, backbone_for_pipeline, supported_pipelines
from aptp.engine.space import UnsupportedModelError, UnsupportedUNetError  # noqa: F401 - re-exported
from aptp.errors import ModelNotFoundError


DEFAULT_GUIDANCE = 7.5  # SD 2.1's (and diffusers' default) classifier-free guidance scale


@dataclass(frozen=True)
class Alias:
    """A known model: where its weights live and what the package knows about it offline."""

    hub_id: str | None
    unet_config: str | None  # the denoiser's config: a file in aptp/models/configs, for offline work
    vae_scale_factor: int
    resolution: int
    description: str
    prediction_type: str = "epsilon"
    local_path: str | None = None  # for models shipped inside the package
    text_len: int = 77  # tokens per prompt (the tokenizer's model_max_length)
    guidance: float = DEFAULT_GUIDANCE  # recommended classifier-free guidance scale
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers pipeline its folder holds
    component: str = "unet"  # the pipeline attribute (and folder) holding the denoiser


ALIASES: dict[str, Alias] = {
    "toy": Alias(
        hub_id=None,
        unet_config="toy-unet.json",
        vae_scale_factor=4,
        resolution=64,
        prediction_type="v_prediction",
        local_path="assets/toy",
        text_len=24,
        guidance=3.0,  # 7.5 over-saturates this small teacher (docs/shapes-world.md)
        description="the embedded shapes-world model shipped with aptp (8.6M-parameter U-Net, SD 2.1 topology)",
    ),
    "sd2.1": Alias(
        hub_id="stabilityai/stable-diffusion-2-1",
        unet_config="sd2.1-unet.json",
        vae_scale_factor=8,
        resolution=768,
        prediction_type="v_prediction",
        description="Stable Diffusion 2.1 (768-v), 865.9M-parameter U-Net",
    ),
    "sd1.5": Alias(
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
        unet_config="sd1.5-unet.json",
        vae_scale_factor=8,
        resolution=512,
        prediction_type="epsilon",
        description="Stable Diffusion 1.5, 859.5M-parameter U-Net",
    ),
    "sdxl": Alias(
        hub_id="stabilityai/stable-diffusion-xl-base-1.0",
        unet_config="sdxl-unet.json",
        vae_scale_factor=8,
        resolution=1024,
        prediction_type="epsilon",
        guidance=5.0,  # StableDiffusionXLPipeline's default guidance_scale
        pipeline_class="StableDiffusionXLPipeline",
        description="Stable Diffusion XL base 1.0, 2,567.5M-parameter U-Net (two text encoders, text_time conditioning)",
    ),
    "toy-dit": Alias(
        hub_id=None,
        unet_config=None,  # read from the shipped folder's transformer/config.json
        vae_scale_factor=4,
        resolution=64,
        prediction_type="v_prediction",
        local_path="assets/toy-dit",
        text_len=24,
        guidance=3.0,
        pipeline_class="PixArtAlphaPipeline",
        component="transformer",
        description="the embedded shapes-world diffusion transformer (PixArt-style, shares the toy's VAE and text encoder)",
    ),
    "pixart-alpha": Alias(
        hub_id="PixArt-alpha/PixArt-XL-2-1024-MS",
        unet_config="pixart-alpha-xl-2-1024-transformer.json",
        vae_scale_factor=8,
        resolution=1024,
        text_len=120,
        guidance=4.5,  # PixArtAlphaPipeline's default guidance_scale
        pipeline_class="PixArtAlphaPipeline",
        component="transformer",
        description="PixArt-α XL-2 1024, 611.3M-parameter cross-attention DiT (T5-XXL text, 120 tokens)",
    ),
    "sd3-medium": Alias(
        hub_id="stabilityai/stable-diffusion-3-medium-diffusers",
        unet_config="sd3-medium-transformer.json",
        vae_scale_factor=8,
        resolution=1024,
        prediction_type="flow",
        text_len=333,
        guidance=7.0,  # StableDiffusion3Pipeline's default guidance_scale
        pipeline_class="StableDiffusion3Pipeline",
        component="transformer",
        description="Stable Diffusion 3 medium, 2,028.3M-parameter MMDiT (CLIP-L, CLIP-G and T5-XXL: 77 + 256 tokens)",
    ),
    "flux-dev": Alias(
        hub_id="black-forest-labs/FLUX.1-dev",
        unet_config="flux1-dev-transformer.json",
        vae_scale_factor=8,
        resolution=1024,
        prediction_type="flow",
        text_len=512,
        guidance=3.5,  # FluxPipeline's default (distilled) guidance
        pipeline_class="FluxPipeline",
        component="transformer",
        description="FLUX.1 [dev], 11,901.4M-parameter MMDiT (19 double- + 38 single-stream blocks, T5 512 tokens)",
    ),
}


def _pipelines() -> tuple[str, ...]:
    return supported_pipelines()

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved ``--model`` value.

    Attributes:
        name: what the user passed.
        kind: ``alias``, ``folder`` or ``hub``.
        source: what diffusers loads from (hub id or folder path), None if weights are unavailable.
        alias: the alias entry, if any.
    """

    name: str
    kind: str
    source: str | None
    alias: Alias | None = None

    @property
    def unet_subfolder(self) -> str | None:
        """The pipeline subfolder holding the denoiser (``unet`` or ``transformer``), or None for a
        bare denoiser folder."""
        if self.alias is not None:
            return self.alias.component
        if self.kind == "folder":
            root = Path(self.source)
            if not (root / "model_index.json").is_file():
                return None  # a bare denoiser folder
            return "transformer" if (root / "transformer" / "config.json").is_file() and not (
                root / "unet" / "config.json").is_file() else "unet"
        return "unet"

    subfolder = unet_subfolder


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve_model(name: str) -> ModelRef:
    """Resolve a ``--model`` value without loading anything.

    Raises:
        ModelNotFoundError: not an alias, not an existing folder, and not shaped like a hub id.
    """
    if name in ALIASES:
        a = ALIASES[name]
        if a.local_path is not None:
            return ModelRef(name, "alias", str(resources.files("aptp.models") / a.local_path), a)
        return ModelRef(name, "alias", a.hub_id, a)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not ((p / "model_index.json").is_file() or (p / "config.json").is_file()
                                  or (p / "unet" / "config.json").is_file()):
            raise ModelNotFoundError(
                f"--model {name}: not a diffusers folder (expected model_index.json, unet/config.json "
                f"or a U-Net / transformer config.json inside)"
            )
        return ModelRef(name, "folder", str(p.resolve()))
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return ModelRef(name, "hub", name)
    raise ModelNotFoundError(
        f"--model {name!r}: unknown model; use an alias ({', '.join(sorted(ALIASES))}), "
        f"a local diffusers folder, or a hub id like owner/name"
    )


def _hub_file(repo: str, filename: str, local_only: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_only or offline()))
    except Exception as exc:  # the hub library raises several types for "not cached / unreachable"
        raise ModelNotFoundError(_missing_weights_message(repo, filename, exc)) from None


def _missing_weights_message(repo: str, what: str, exc: Exception | None = None) -> str:
    why = "is not in the Hugging Face cache" + (" and the hub is unreachable" if not offline() else " (HF_HUB_OFFLINE=1)")
    return (
        f"{repo}: {what} {why}; fetch it on a connected machine with "
        f"`hf download {repo}` (then copy ~/.cache/huggingface) or pass "
        f"--model /path/to/a/local/diffusers/folder"
    )


def unet_config(ref: ModelRef, local_only: bool = False) -> dict:
    """The denoiser config (U-Net or transformer) of a model, offline for aliases with a shipped config.

    Raises:
        ModelNotFoundError: the folder has no denoiser config (or an unreadable one).
        UnsupportedModelError: a model the engine can not handle (one line naming what).
    """
    sub = ref.unet_subfolder
    if ref.alias is not None and ref.alias.unet_config is not None:
        text = (resources.files("aptp.models") / "configs" / ref.alias.unet_config).read_text()
        cfg = json.loads(text)
    elif ref.kind == "alias" or ref.kind == "folder":
        root = Path(ref.source)
        path = root / "config.json" if sub is None else root / sub / "config.json"
        if not path.is_file():
            cls = _pipeline_class_name(ref)
            raise ModelNotFoundError(
                f"--model {ref.name}: {path} is missing" + (f" (a {cls} has no U-Net or transformer)" if cls else "")
                + f"; aptp prunes the denoiser of {', '.join(_pipelines())} folders")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"--model {ref.name}: {path} is not a readable JSON config ({exc})"
                                     .splitlines()[0]) from None
    else:
        cfg = json.loads(_hub_file(ref.source, f"{sub}/config.json", local_only).read_text())
    if not isinstance(cfg, dict):
        raise ModelNotFoundError(f"--model {ref.name}: its denoiser config is not a JSON object")
    backbone_for(cfg, f"--model {ref.name}").check_config(cfg, f"--model {ref.name}")
    return cfg


model_config = unet_config


def model_backbone(ref: ModelRef, local_only: bool = False):
    """The backbone adapter of a model's denoiser (from its config, offline for aliases)."""
    return backbone_for(unet_config(ref, local_only), f"--model {ref.name}")


def _pipeline_class_name(ref: ModelRef, local_only: bool = False) -> str | None:
    """``_class_name`` of the model's ``model_index.json`` (None for a bare U-Net folder)."""
    if ref.alias is not None and ref.alias.local_path is None:
        return ref.alias.pipeline_class
    if ref.source is None:
        return None
    if Path(ref.source).is_dir():
        index = Path(ref.source) / "model_index.json"
        if not index.is_file():
            return None
        try:
            return json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise ModelNotFoundError(f"--model {ref.name}: {index} is not a readable JSON file") from None
    return json.loads(_hub_file(ref.source, "model_index.json", local_only).read_text()).get("_class_name")


def vae_scale_factor(ref: ModelRef, local_only: bool = False) -> int:
    """Image pixels per latent pixel (8 for SD): 2 ** (number of VAE blocks - 1)."""
    if ref.alias is not None:
        return ref.alias.vae_scale_factor
    if ref.kind == "folder":
        path = Path(ref.source) / "vae" / "config.json"
        if not path.is_file():
            return 8
        cfg = json.loads(path.read_text())
    else:
        cfg = json.loads(_hub_file(ref.source, "vae/config.json", local_only).read_text())
    return 2 ** (len(cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)


def default_text_len(ref: ModelRef) -> int:
    """Text tokens per prompt the denoiser sees: the alias's, else what a pipeline folder's
    tokenizers give (the backbone decides, as for the teacher's ``text_len`` while pruning), else
    the backbone's default (77 for SD)."""
    if ref.alias is not None:
        return ref.alias.text_len
    try:
        backbone = model_backbone(ref)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the command that loads it
        return 77
    lengths: dict[str, int] = {}
    if ref.kind == "folder":
        for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
            cfg = Path(ref.source) / name / "tokenizer_config.json"
            try:
                lengths[name] = int(json.loads(cfg.read_text()).get("model_max_length", 10**9))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
    try:
        cls = _pipeline_class_name(ref)
    except Exception:  # noqa: BLE001
        cls = None
    return backbone.text_len_from(cls, lengths)


def default_guidance(name: str | None) -> float:
    """The recommended guidance scale of a ``--model`` value: the alias's, else 7.5."""
    alias = ALIASES.get(name) if name is not None else None
    return alias.guidance if alias is not None else DEFAULT_GUIDANCE


def default_resolution(ref: ModelRef, local_only: bool = False) -> int:
    """The model's native image size."""
    if ref.alias is not None:
        return ref.alias.resolution
    return int(model_backbone(ref, local_only).native_size(unet_config(ref, local_only),
                                                           vae_scale_factor(ref, local_only)))


def build_unet(ref: ModelRef, device: str | torch.device = "meta", local_only: bool = False) -> nn.Module:
    """The denoiser's architecture (U-Net or transformer) without weights (meta device by
    default): no download of weights."""
    cfg = unet_config(ref, local_only)
    return backbone_for(cfg, f"--model {ref.name}").build(cfg, device)


build_model = build_unet


def load_unet(ref: ModelRef, dtype: torch.dtype = torch.float32, local_only: bool = False,
              revision: str | None = None) -> nn.Module:
    """Load the denoiser (U-Net or transformer) with its weights.

    Raises:
        ModelNotFoundError: weights are neither local nor downloadable, with the command to get them.
    """
    import diffusers

    if ref.source is None:
        raise ModelNotFoundError(f"--model {ref.name}: no weights are known for this alias")
    cfg = unet_config(ref, local_only)  # refuse an unsupported denoiser before loading its weights
    cls = getattr(diffusers, cfg.get("_class_name") or "UNet2DConditionModel")
    kwargs = dict(dtype=dtype, revision=revision)
    if ref.unet_subfolder is not None:
        kwargs["subfolder"] = ref.unet_subfolder
    if ref.kind != "folder" and not Path(ref.source).is_dir():
        kwargs["local_files_only"] = local_only or offline()
    try:
        return cls.from_pretrained(ref.source, **kwargs).eval()
    except (OSError, ValueError) as exc:
        if ref.kind == "folder" or Path(ref.source).is_dir():
            raise ModelNotFoundError(f"--model {ref.name}: could not load the U-Net: {exc}".splitlines()[0]) from None
        raise ModelNotFoundError(_missing_weights_message(ref.source, "U-Net weights")) from None


def denoiser_of(pipe) -> nn.Module:
    """A pipeline's denoiser: its ``unet`` or ``transformer`` (whichever the family holds).

    Raises:
        UnsupportedModelError: it holds neither, or a denoiser no backbone adapter handles.
    """
    for name in ("unet", "transformer"):
        m = getattr(pipe, name, None)
        if m is not None:
            backbone_for(m, f"the {type(pipe).__name__}'s {name}")
            return m
    raise UnsupportedModelError(f"a {type(pipe).__name__} holds neither a unet nor a transformer")


def load_pipeline(ref: ModelRef, dtype: torch.dtype = torch.float32, local_only: bool = False,
                  revision: str | None = None):
    """Load the whole pipeline (VAE, text encoder(s), tokenizer(s), scheduler, denoiser): the
    class ``model_index.json`` (or the alias) names, one of the supported pipelines
    (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``, ...)."""
    import diffusers

    if ref.source is None or ref.unet_subfolder is None:
        raise ModelNotFoundError(f"--model {ref.name}: a full pipeline folder is needed, not a bare U-Net")
    if ref.alias is not None and ref.alias.local_path is not None and not (Path(ref.source) / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"--model {ref.name}: its weights are not installed at {ref.source}; train them with "
            + ("recipes/toy-dit-teacher.yaml (python -m aptp.train.toy_dit train ...)" if ref.name == "toy-dit"
               else "recipes/toy-*.yaml (python -m aptp.train.toy ...)")
            + " and export, or pass --model FOLDER")
    cls_name = _pipeline_class_name(ref, local_only) or "StableDiffusionPipeline"
    if backbone_for_pipeline(cls_name) is None:
        raise UnsupportedModelError(f"--model {ref.name}: a {cls_name} is not supported; aptp loads "
                                    f"{', '.join(_pipelines())} folders")
    unet_config(ref, local_only)  # refuse an unsupported denoiser before loading any weights
    pipeline_cls = getattr(diffusers, cls_name)
    kwargs = dict(dtype=dtype, revision=revision)
    if cls_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if not Path(ref.source).is_dir():
        kwargs["local_files_only"] = local_only or offline()
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()  # our commands show their own progress
    tlogging.disable_progress_bar()
    try:
        return pipeline_cls.from_pretrained(ref.source, **kwargs)
    except (OSError, ValueError) as exc:
        if Path(ref.source).is_dir():
            raise ModelNotFoundError(f"--model {ref.name}: could not load the pipeline: {exc}".splitlines()[0]) from None
        raise ModelNotFoundError(_missing_weights_message(ref.source, "the pipeline")) from None
