"""Stage ``vae`` of :mod:`aptp.train.toy`: the toy AutoencoderKL, trained on shapes images alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from aptp.models import toy
from aptp.train.toy_common import (
    _adamw,
    _clip_grad,
    _generator,
    _n_train,
    _n_val,
    _Output,
    _per_tier,
    _render,
    _save_dir_atomically,
    _Schedule,
    _Stage,
    _state,
    _tier_ids,
    _to_float,
)

__all__ = ["VaeTrainSettings"]


class VaeTrainSettings(_Schedule):
    """Stage ``vae``: the AutoencoderKL, trained on shapes images alone."""

    steps: int = Field(2400, ge=0, description="Optimiser steps in all.")
    batch_size: int = Field(16, ge=1, description="Images per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    l1_weight: float = Field(1.0, ge=0, description="Weight of the L1 reconstruction loss.")
    mse_weight: float = Field(1.0, ge=0, description="Weight of the squared reconstruction loss.")
    edge_weight: float = Field(
        0.5, ge=0,
        description="Weight of an L1 loss on horizontal/vertical pixel differences (sharp edges, legible text).")
    kl_weight: float = Field(1e-5, ge=0, description="Weight of the KL term, per latent element.")
    val_samples: int = Field(256, ge=1, description="Validation images for PSNR.")
    scaling_samples: int = Field(
        2000, ge=1, description="Training images whose latents set the VAE's scaling_factor (1 / std).")



class _VaeStage(_Stage):
    name = "vae"
    cfg: VaeTrainSettings

    def __init__(self, settings: Any, out: Path, output: _Output) -> None:
        super().__init__(settings, out, output)
        t0 = time.perf_counter()
        self.images, _, _ = _render(self.world, "train", _n_train(self.cfg, self.world))
        self.val_images, _, val_tiers = _render(self.world, "validation", _n_val(self.cfg.val_samples, self.world))
        self.val_tiers = _tier_ids(val_tiers)
        output.say(f"rendered {len(self.images)} train + {len(self.val_images)} validation images "
                   f"in {time.perf_counter() - t0:.1f} s")
        torch.manual_seed(settings.seed)
        self.vae = toy.build_vae().train()
        self.optimizer = _adamw([self.vae], self.cfg)
        self.params = [p for p in self.vae.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Any]:
        return {"vae": _state(self.vae), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        g = _generator(self.settings.seed, self.name, step)
        lr = self._set_lr(self.optimizer, step)
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=g)
        x = _to_float(self.images[idx])  # (B, 3, 64, 64)
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=g)  # (B, 4, 16, 16)
        rec = self.vae.decode(z).sample  # (B, 3, 64, 64)
        diff = rec - x
        l1, mse = diff.abs().mean(), diff.pow(2).mean()
        edge = ((diff[..., :, 1:] - diff[..., :, :-1]).abs().mean()
                + (diff[..., 1:, :] - diff[..., :-1, :]).abs().mean())
        kl = posterior.kl().mean() / z[0].numel()
        loss = cfg.l1_weight * l1 + cfg.mse_weight * mse + cfg.edge_weight * edge + cfg.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip_grad(self.params, cfg.grad_clip)
        self.optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "edge": edge.item(), "kl": kl.item(),
                "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.vae.eval()
        psnr = []
        for chunk in torch.split(self.val_images, 128):
            x = _to_float(chunk)
            rec = self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3))  # per image, on the [0, 1] scale
            psnr.append(10 * torch.log10(1 / mse.clamp_min(1e-10)))
        self.vae.train()
        return _per_tier(torch.cat(psnr), self.val_tiers, "val_psnr")

    @torch.no_grad()
    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        # SD scales latents to unit variance with a factor measured on data (0.18215 for its
        # VAE); do the same so the U-Net sees noise-level-matched inputs.
        self.vae.eval()
        n = min(self.cfg.scaling_samples, len(self.images))
        g = torch.Generator().manual_seed(self.settings.seed)
        latents = torch.cat([self.vae.encode(_to_float(chunk)).latent_dist.sample(generator=g)
                             for chunk in torch.split(self.images[:n], 250)])  # (n, 4, 16, 16)
        std = float(latents.std())
        scaling = 1.0 / std
        self.vae.register_to_config(scaling_factor=scaling)
        _save_dir_atomically(lambda d: self.vae.save_pretrained(d, safe_serialization=True), self.out / "vae")
        self.output.say(f"latent std {std:.4f} over {n} images -> scaling_factor {scaling:.5f}; "
                        f"wrote {self.out / 'vae'}")
        return {"scaling_factor": scaling, "latent_std": std, "latent_mean": float(latents.mean()),
                "product": "vae"}

