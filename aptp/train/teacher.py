"""The frozen teacher pipeline as the training loops use it: latents, text, noise schedule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from aptp.models.conditioning import Conditioning, encode_prompts, unet_forward
from aptp.models.registry import load_pipeline, resolve_model
from aptp.settings import ModelSettings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Teacher:
    """A loaded Stable-Diffusion-style pipeline with every part frozen.

    Attributes:
        pipeline: the diffusers pipeline (its ``unet`` is the one pruned and gated).
        noise_scheduler: a ``DDPMScheduler`` with the pipeline scheduler's config (same betas and
            prediction type), for training.
        vae_scale_factor: image pixels per latent pixel.
        text_len: tokens per prompt (the tokenizer's ``model_max_length``).
    """

    pipeline: object
    noise_scheduler: object
    vae_scale_factor: int
    text_len: int

    @property
    def unet(self) -> nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> nn.Module:
        return self.pipeline.vae

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the scaled latent distribution of images in [-1, 1]."""
        vae = self.vae
        dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        sf = vae.config.scaling_factor
        return dist.mean * sf, dist.std * sf

    @torch.no_grad()
    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> Conditioning:
        """The U-Net conditioning of ``prompts`` exactly as the pipeline computes it: the
        (B, text_len, dim) token embeddings and, for SDXL, the pooled embedding of the second text
        encoder and the time ids of images of ``size`` (h, w; default the model's native size)."""
        return encode_prompts(self.pipeline, prompts, size)

    @staticmethod
    def predict(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """A U-Net's prediction under ``cond`` (the teacher's, a gated or a sliced one, wrapped or not)."""
        return unet_forward(unet, sample, timestep, cond)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    return module.eval()


def load_teacher(model: ModelSettings, device: torch.device | str = "cpu") -> Teacher:
    """Load the pipeline named by the ``model`` settings, frozen, on ``device``."""
    from diffusers import DDPMScheduler

    ref = resolve_model(model.name)
    pipe = load_pipeline(ref, dtype=DTYPES[model.dtype], local_only=model.local_files_only, revision=model.revision)
    pipe.to(device)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:  # text_encoder_2: SDXL
            freeze(getattr(pipe, part))
    pipe.set_progress_bar_config(disable=True)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    return Teacher(pipeline=pipe, noise_scheduler=noise,
                   vae_scale_factor=int(pipe.vae_scale_factor),
                   text_len=int(pipe.tokenizer.model_max_length))
