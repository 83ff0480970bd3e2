"""The denoising objective of the teacher's own scheduler (epsilon or v-prediction)."""

from __future__ import annotations

import torch


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net is trained to predict under the scheduler's ``prediction_type``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def noisy_batch(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None):
    """Sample noise and timesteps, return (noisy latents, timesteps, target)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    return scheduler.add_noise(latents, noise, t), t, diffusion_target(scheduler, latents, noise, t)
