"""The frozen teacher pipeline as the training loops use it: latents, text, noise schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aptp.engine.backbones import Backbone, backbone_for
from aptp.models.conditioning import Conditioning
from aptp.models.registry import denoiser_of, load_pipeline, resolve_model
from aptp.settings import ModelSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Teacher:
    """A loaded text-to-image pipeline with every part frozen.

    Attributes:
        pipeline: the diffusers pipeline (its denoiser — ``unet`` or ``transformer`` — is the one
            pruned and gated).
        noise_scheduler: the training scheduler: a ``DDPMScheduler`` with the pipeline scheduler's
            config (same betas and prediction type), or the flow-matching scheduler itself.
        vae_scale_factor: image pixels per latent pixel.
        text_len: text tokens per prompt the denoiser sees.
        backbone: the denoiser's adapter.
    """

    pipeline: object
    noise_scheduler: object
    vae_scale_factor: int
    text_len: int
    backbone: Backbone | None = None

    def __post_init__(self):
        if self.backbone is None:
            self.backbone = backbone_for(self.denoiser)

    @property
    def denoiser(self) -> nn.Module:
        """The U-Net or diffusion transformer."""
        return denoiser_of(self.pipeline)

    @property
    def unet(self) -> nn.Module:  # the name before diffusion transformers
        return self.denoiser

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled latent distribution of images in [-1, 1] (shifted first by the
        VAE's ``shift_factor`` where it has one, as SD3 / Flux pipelines decode ``z / sf + shift``)."""
        vae = self.vae
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        sf = vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (dist.mean - shift) * sf, dist.std * sf

    @torch.no_grad()
    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The U-Net conditioning of ``prompts`` exactly as the pipeline computes it: the
        (B, text_len, dim) token embeddings and, for SDXL, the pooled embedding of the second text
        encoder and the time ids of images of ``size`` (h, w; default the model's native size)."""
        return self.backbone.encode_prompts(self.pipeline, prompts, size, self.text_len)

    def predict(self, unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """A denoiser's prediction under ``cond`` (the teacher's, a gated or a sliced one, wrapped
        or not), in the latent's shape."""
        return self.backbone.forward(unet, sample, timestep, cond)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def load_teacher(model: ModelSettings, device: torch.device | str = "cpu") -> Teacher:
    """Load the pipeline named by the ``model`` settings, frozen, on ``device``."""
    from aptp.train.diffusion import training_scheduler

    ref = resolve_model(model.name)
    pipe = load_pipeline(ref, dtype=DTYPES[model.dtype], local_only=model.local_files_only, revision=model.revision)
    pipe.to(device)
    for part in pipe.components.values():  # denoiser, VAE and every text encoder
        if isinstance(part, nn.Module):
            freeze(part)
    pipe.set_progress_bar_config(disable=True)
    backbone = backbone_for(denoiser_of(pipe))
    return Teacher(pipeline=pipe, noise_scheduler=training_scheduler(pipe.scheduler),
                   vae_scale_factor=int(pipe.vae_scale_factor), text_len=backbone.text_len(pipe),
                   backbone=backbone)
