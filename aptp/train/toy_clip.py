"""Stage ``clip`` of :mod:`aptp.train.toy`: the domain CLIP, trained contrastively on image-caption pairs."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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

__all__ = ["ClipTrainSettings"]


class ClipTrainSettings(_Schedule):
    """Stage ``clip``: the domain CLIP, trained contrastively on image-caption pairs."""

    steps: int = Field(1500, ge=0, description="Optimiser steps in all.")
    batch_size: int = Field(128, ge=2, description="Image-caption pairs per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    shift: int = Field(2, ge=0, le=8, description="Random translation of training images by up to this many pixels.")
    val_samples: int = Field(500, ge=2, description="Validation pairs for top-1 caption retrieval.")



class _ClipStage(_Stage):
    name = "clip"
    cfg: ClipTrainSettings

    def __init__(self, settings: Any, out: Path, output: _Output) -> None:
        super().__init__(settings, out, output)
        t0 = time.perf_counter()
        self.images, captions, _ = _render(self.world, "train", _n_train(self.cfg, self.world))
        self.val_images, self.val_captions, val_tiers = _render(
            self.world, "validation", _n_val(self.cfg.val_samples, self.world))
        self.val_tiers = _tier_ids(val_tiers)
        output.say(f"rendered {len(self.images)} train + {len(self.val_images)} validation pairs "
                   f"in {time.perf_counter() - t0:.1f} s")
        self.tokenizer = toy.build_tokenizer(toy.CLIP_CONTEXT_LENGTH)
        self.tokens = self._tokenize(captions)  # (N, L)
        # Identical captions (common in the easy tier) are positives of each other, not negatives.
        index: dict[str, int] = {}
        self.caption_ids = torch.tensor([index.setdefault(c, len(index)) for c in captions])
        torch.manual_seed(settings.seed)
        self.model = toy.build_domain_clip(seed=settings.seed).train()
        self.optimizer = _adamw([self.model], self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=toy.CLIP_CONTEXT_LENGTH,
                              truncation=True, return_tensors="pt").input_ids

    def state_dict(self) -> dict[str, Any]:
        return {"model": _state(self.model), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def _shift(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        s = self.cfg.shift
        if s == 0:
            return x
        padded = F.pad(x, (s, s, s, s), mode="replicate")  # (B, 3, 64 + 2s, 64 + 2s)
        offsets = torch.randint(0, 2 * s + 1, (len(x), 2), generator=g).tolist()
        size = x.shape[-1]
        return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        g = _generator(self.settings.seed, self.name, step)
        lr = self._set_lr(self.optimizer, step)
        idx = torch.randint(len(self.images), (cfg.batch_size,), generator=g)
        x = self._shift(_to_float(self.images[idx]), g)  # (B, 3, 64, 64)
        image_f = self.model.encode_image(x, normalize=True)  # (B, D)
        text_f = self.model.encode_text(self.tokens[idx], normalize=True)  # (B, D)
        logits = self.model.logit_scale.exp() * image_f @ text_f.T  # (B, B)
        cap = self.caption_ids[idx]
        same = (cap[:, None] == cap[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip_grad(self.params, cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))  # as in CLIP
        return {"loss": loss.item(), "logit_scale": self.model.logit_scale.exp().item(),
                "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Top-1 caption retrieval: for each validation image, is its caption the best of all distinct captions?"""
        self.model.eval()
        unique = sorted(set(self.val_captions))
        target = torch.tensor([unique.index(c) for c in self.val_captions])
        image_f = torch.cat([self.model.encode_image(_to_float(c), normalize=True)
                             for c in torch.split(self.val_images, 250)])
        text_f = self.model.encode_text(self._tokenize(unique), normalize=True)
        hits = ((image_f @ text_f.T).argmax(dim=1) == target).float()
        self.model.train()
        return {**_per_tier(hits, self.val_tiers, "val_top1"), "val_captions": float(len(unique))}

    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        _save_dir_atomically(lambda d: toy.save_domain_clip(self.model, d), self.out / "domain-clip")
        self.output.say(f"wrote {self.out / 'domain-clip'}")
        return {"product": "domain-clip"}

