"""Model-dependent defaults: what a setting is when the user leaves it alone.

The built-in defaults of :mod:`aptp.settings` are the embedded ``toy`` world's. For any other
model the settings that depend on the model — the training resolution, the resolution at which
MACs (and so budgets) are counted, the sampling size, and the paper's schedules and learning
rates for a Stable-Diffusion-sized model — come from the model instead, unless a recipe, the
environment, a flag or ``--set`` gives them. :func:`model_defaults` returns those values with
the reason for each, and :func:`aptp.settings.resolve_settings` applies them to every key no
source set; ``settings.yaml`` records the reason next to the value.

The "paper" profile (App. E of the APTP paper, the COCO/CC3M recipes): train at 256 px,
500 warm-up + 2,500 code steps, AdamW base lr 2e-4 scaled by √(global batch) (the official
implementation's ``scale_lr``; :class:`aptp.settings.PruneSettings`), 100 lr warm-up steps,
batch 64 per process; fine-tuning 30k steps at lr 1e-5, batch 128, with an EMA. SDXL trains at
512 px (its native 1024 px halved; the paper's 256 px is a third of SD 2.1's 768 px, and SDXL
at 256 px is far outside what it was trained for).
"""

from __future__ import annotations

from typing import Any

__all__ = ["PAPER_PROFILE", "generation_resolution", "macs_resolution", "model_defaults"]

PAPER_PROFILE: dict[str, Any] = {
    "data.resolution": 256,
    "prune.warmup_steps": 500,
    "prune.steps": 2500,
    "prune.lr": 2.0e-4,
    "prune.lr_warmup_steps": 100,
    "prune.batch_size": 64,
    "finetune.steps": 30000,
    "finetune.lr": 1.0e-5,
    "finetune.batch_size": 128,
    "finetune.ema": True,
}

# the embedded toy DiT: every prune step runs the 5.1M-parameter transformer three times (gated
# forward + backward, teacher forward) on 64 tokens per image; at the toy U-Net's batch 64 that is
# ~2 s a step on 2 CPU cores, so it prunes at batch 32 with the base lr that gives the same
# effective lr of 1e-2 (x sqrt(32)), and `aptp prune --model toy-dit` stays within 15 minutes
TOY_DIT_PROFILE: dict[str, Any] = {
    "prune.batch_size": 32,
    "prune.lr": 1.77e-3,
}

# training resolution per model family where the paper's 256 px does not fit
_TRAIN_RESOLUTION = {"sdxl": 512, "dit": 512}


def generation_resolution(name: str, local_only: bool = False) -> int | None:
    """The image size a model generates at (and is deployed at): the alias's, else the U-Net's
    ``sample_size`` times the VAE scale factor; None when the config cannot be read offline."""
    from aptp.errors import AptpUserError
    from aptp.models.registry import default_resolution, resolve_model

    try:
        return int(default_resolution(resolve_model(name), local_only))
    except (AptpUserError, OSError, ValueError, KeyError, TypeError):
        return None


def macs_resolution(settings, vae_scale_factor: int) -> int:
    """The image size MACs are counted at: ``space.macs_resolution``, else the model's generation
    resolution, else the training resolution; a multiple of the VAE scale factor."""
    from aptp.errors import SettingsError

    res = settings.space.macs_resolution
    if res is None:
        res = generation_resolution(settings.model.name) or settings.data.resolution
    if res % vae_scale_factor:
        raise SettingsError(f"space.macs_resolution {res}: must be a multiple of the VAE scale factor {vae_scale_factor}")
    return int(res)


TOY_MODELS = ("toy", "toy-dit")


def _config(name: str) -> dict | None:
    from aptp.errors import AptpUserError
    from aptp.models.registry import resolve_model, unet_config

    try:  # aliases ship their denoiser config, so this works offline for them too
        return unet_config(resolve_model(name))
    except (AptpUserError, OSError, ValueError, KeyError, TypeError):
        return None


def _bare(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def toy_model(name: str, cfg: dict | None = None) -> str | None:
    """``toy`` / ``toy-dit`` for an embedded model — the alias, or a folder (a copy, a fine-tuned
    version) whose denoiser has the embedded model's exact architecture — else None. A copy gets
    the toy's CPU-sized schedules, not the paper's Stable-Diffusion-sized ones."""
    if name in TOY_MODELS:
        return name
    cfg = _config(name) if cfg is None else cfg
    if cfg is None:
        return None
    for alias in TOY_MODELS:
        shipped = _config(alias)
        if shipped is not None and _bare(shipped) == _bare(cfg):
            return alias
    return None


def _family(name: str) -> str:
    """``toy`` for the embedded models (and folders of their architecture), ``sdxl`` for
    SDXL-style U-Nets, ``dit`` for diffusion transformers (PixArt, SD3, Flux), else ``sd``."""
    cfg = None if name in TOY_MODELS else _config(name)  # read once, for both questions
    if toy_model(name, cfg) is not None:
        return "toy"
    if cfg is None:
        return "sd"
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        return "dit"
    return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd"


def model_defaults(name: str) -> dict[str, tuple[Any, str]]:
    """Dotted setting → (value, reason) for the model ``name`` (alias, folder or hub id).

    The toy's values are the built-in defaults, so for it only the resolutions are given.
    Nothing here loads weights; a folder's or a cached hub model's config is read when needed.
    """
    out: dict[str, tuple[Any, str]] = {}
    gen = generation_resolution(name)
    if gen is not None:
        why = f"model {name}: generation resolution"
        out["space.macs_resolution"] = (gen, why)
        out["generate.height"] = (gen, why)
        out["generate.width"] = (gen, why)
    family = _family(name)
    if toy_model(name) == "toy-dit":
        for key, value in TOY_DIT_PROFILE.items():
            out[key] = (value, f"model {name}: the toy DiT's CPU schedule")
    if family == "toy":
        return out
    for key, value in PAPER_PROFILE.items():
        out[key] = (value, f"model {name}: paper recipe (App. E)")
    if family in _TRAIN_RESOLUTION:  # never above what the model generates at
        res = _TRAIN_RESOLUTION[family] if gen is None else min(_TRAIN_RESOLUTION[family], gen)
        out["data.resolution"] = (res, f"model {name}: half its generation resolution" if res < (gen or 2 * res)
                                  else f"model {name}: its generation resolution")
    if family == "dit":  # their own samplers (DPM-Solver for PixArt, flow-matching Euler for SD3 / Flux)
        out["generate.scheduler"] = ("default", f"model {name}: the pipeline's own scheduler")
    return out
