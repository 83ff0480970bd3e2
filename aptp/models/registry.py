"""Model registry: ``--model`` accepts an alias, a local diffusers folder, or a hub id.

- An alias names a known model. Its U-Net config ships with aptp, so anything that needs only the
  architecture (units, MACs) works offline on the meta device; its weights come from the Hugging
  Face hub or cache like any hub id.
- A local folder is a diffusers pipeline folder (``model_index.json`` + ``unet/`` ...) or a bare
  U-Net folder (``config.json`` of a ``UNet2DConditionModel``).
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

from aptp.engine.space import UnsupportedUNetError, check_unet_config
from aptp.errors import ModelNotFoundError


DEFAULT_GUIDANCE = 7.5  # SD 2.1's (and diffusers' default) classifier-free guidance scale


@dataclass(frozen=True)
class Alias:
    """A known model: where its weights live and what the package knows about it offline."""

    hub_id: str | None
    unet_config: str | None  # file name in aptp/models/configs, for offline architecture work
    vae_scale_factor: int
    resolution: int
    description: str
    prediction_type: str = "epsilon"
    local_path: str | None = None  # for models shipped inside the package
    text_len: int = 77  # tokens per prompt (the tokenizer's model_max_length)
    guidance: float = DEFAULT_GUIDANCE  # recommended classifier-free guidance scale
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers pipeline its folder holds


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
}

PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

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
        if self.kind == "folder" and not (Path(self.source) / "model_index.json").is_file():
            return None  # a bare U-Net folder
        return "unet"


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
                f"or a U-Net config.json inside)"
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
    """The U-Net config of a model, offline for aliases with a shipped config.

    Raises:
        ModelNotFoundError: the folder has no U-Net config (or an unreadable one).
        UnsupportedUNetError: a U-Net the engine can not handle (one line naming what).
    """
    if ref.alias is not None and ref.alias.unet_config is not None:
        text = (resources.files("aptp.models") / "configs" / ref.alias.unet_config).read_text()
        cfg = json.loads(text)
    elif ref.kind == "alias" or ref.kind == "folder":
        root = Path(ref.source)
        path = root / "config.json" if ref.unet_subfolder is None else root / "unet" / "config.json"
        if not path.is_file():
            cls = _pipeline_class_name(ref)
            raise ModelNotFoundError(
                f"--model {ref.name}: {path} is missing" + (f" (a {cls} has no U-Net)" if cls else "")
                + "; aptp prunes the UNet2DConditionModel of SD 1.x / 2.x / SDXL pipelines")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"--model {ref.name}: {path} is not a readable JSON config ({exc})"
                                     .splitlines()[0]) from None
    else:
        cfg = json.loads(_hub_file(ref.source, "unet/config.json", local_only).read_text())
    if not isinstance(cfg, dict):
        raise ModelNotFoundError(f"--model {ref.name}: its U-Net config is not a JSON object")
    check_unet_config(cfg, f"--model {ref.name}")
    return cfg


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
    """Tokens per prompt that cross-attention sees: the alias's, else a pipeline folder's tokenizer
    ``model_max_length`` (the teacher's ``text_len`` while pruning), else 77 (CLIP's)."""
    if ref.alias is not None:
        return ref.alias.text_len
    if ref.kind == "folder":
        cfg = Path(ref.source) / "tokenizer" / "tokenizer_config.json"
        try:
            n = int(json.loads(cfg.read_text()).get("model_max_length", 77))
        except (OSError, ValueError, TypeError, AttributeError):
            return 77
        return n if 0 < n <= 4096 else 77  # transformers writes a huge sentinel when unset
    return 77


def default_guidance(name: str | None) -> float:
    """The recommended guidance scale of a ``--model`` value: the alias's, else 7.5."""
    alias = ALIASES.get(name) if name is not None else None
    return alias.guidance if alias is not None else DEFAULT_GUIDANCE


def default_resolution(ref: ModelRef, local_only: bool = False) -> int:
    """The model's native image size."""
    if ref.alias is not None:
        return ref.alias.resolution
    return int(unet_config(ref, local_only)["sample_size"]) * vae_scale_factor(ref, local_only)


def build_unet(ref: ModelRef, device: str | torch.device = "meta", local_only: bool = False) -> nn.Module:
    """The U-Net's architecture without weights (meta device by default): no download of weights."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel.from_config(unet_config(ref, local_only))


def load_unet(ref: ModelRef, dtype: torch.dtype = torch.float32, local_only: bool = False,
              revision: str | None = None) -> nn.Module:
    """Load the U-Net with its weights.

    Raises:
        ModelNotFoundError: weights are neither local nor downloadable, with the command to get them.
    """
    from diffusers import UNet2DConditionModel

    if ref.source is None:
        raise ModelNotFoundError(f"--model {ref.name}: no weights are known for this alias")
    if ref.kind == "folder":
        unet_config(ref, local_only)  # refuse an unsupported U-Net before loading its weights
    kwargs = dict(dtype=dtype, revision=revision)
    if ref.unet_subfolder is not None:
        kwargs["subfolder"] = ref.unet_subfolder
    if ref.kind != "folder" and not Path(ref.source).is_dir():
        kwargs["local_files_only"] = local_only or offline()
    try:
        return UNet2DConditionModel.from_pretrained(ref.source, **kwargs).eval()
    except (OSError, ValueError) as exc:
        if ref.kind == "folder" or Path(ref.source).is_dir():
            raise ModelNotFoundError(f"--model {ref.name}: could not load the U-Net: {exc}".splitlines()[0]) from None
        raise ModelNotFoundError(_missing_weights_message(ref.source, "U-Net weights")) from None


def load_pipeline(ref: ModelRef, dtype: torch.dtype = torch.float32, local_only: bool = False,
                  revision: str | None = None):
    """Load the whole pipeline (VAE, text encoder(s), tokenizer(s), scheduler, U-Net): a
    ``StableDiffusionPipeline`` or, when ``model_index.json`` names it (or the alias is ``sdxl``),
    a ``StableDiffusionXLPipeline``."""
    import diffusers

    if ref.source is None or ref.unet_subfolder is None:
        raise ModelNotFoundError(f"--model {ref.name}: a full pipeline folder is needed, not a bare U-Net")
    if ref.alias is not None and ref.alias.local_path is not None and not (Path(ref.source) / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"--model {ref.name}: its weights are not installed at {ref.source}; train them with "
            f"recipes/toy-*.yaml (python -m aptp.train.toy ...) and export, or pass --model FOLDER")
    cls_name = _pipeline_class_name(ref, local_only) or "StableDiffusionPipeline"
    if cls_name not in PIPELINES:
        raise UnsupportedUNetError(f"--model {ref.name}: a {cls_name} is not supported; aptp loads "
                                   f"{' and '.join(PIPELINES)} folders")
    unet_config(ref, local_only)  # refuse an unsupported U-Net before loading any weights
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
