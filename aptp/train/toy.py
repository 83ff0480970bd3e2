"""Train the embedded toy world's models: the VAE, the teacher (text encoder + U-Net), the domain CLIP.

Run one stage at a time (each writes its own run directory)::

    python -m aptp.train.toy vae     --recipe recipes/toy-vae.yaml     --output runs/toy-vae
    python -m aptp.train.toy teacher --recipe recipes/toy-teacher.yaml --output runs/toy-teacher
    python -m aptp.train.toy clip    --recipe recipes/toy-clip.yaml    --output runs/toy-clip
    python -m aptp.train.toy export  --teacher runs/toy-teacher --clip runs/toy-clip

``--steps N`` overrides the recipe's step count, ``--resume`` continues a stopped run from its
checkpoint (``--steps`` may then extend it), ``--overwrite`` replaces a run directory, ``--set
teacher.lr=1e-4`` overrides one setting. ``export`` writes the trained pipeline (float16) and the
domain CLIP into ``aptp/models/assets/`` (or ``--output``).

A run directory holds ``settings.yaml`` (the resolved settings, a valid recipe), ``run-meta.json``,
``metrics.jsonl`` (one JSON object per logged step / evaluation, with measured wall time),
``checkpoint.pt`` (everything needed to resume, rewritten atomically) and, once finished,
``result.json`` plus the stage's product: ``vae/`` (a diffusers ``AutoencoderKL`` folder),
``pipeline/`` (a complete diffusers ``StableDiffusionPipeline`` folder) and ``samples.png``, or
``domain-clip/`` (an open_clip ``local-dir`` folder).

Every random draw of training step ``k`` comes from a generator seeded by ``(seed, stage, k)``,
so a resumed run takes the same batches, noise and timesteps as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from aptp.data.shapes import TIERS, ShapesWorld
from aptp.errors import AptpUserError, SettingsError
from aptp.io import atomic_path, atomic_write_json, atomic_write_yaml, prepare_output_dir, run_metadata
from aptp.models import toy

logger = logging.getLogger(__name__)

__all__ = [
    "STAGES",
    "ClipTrainSettings",
    "TeacherTrainSettings",
    "ToyTrainSettings",
    "VaeTrainSettings",
    "export_assets",
    "load_toy_settings",
    "main",
    "train_stage",
]

STAGES: tuple[str, ...] = ("vae", "teacher", "clip")
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
SETTINGS_FILE = "settings.yaml"

UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]


# ----------------------------------------------------------------------------- settings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Schedule(_Strict):
    """Fields every stage shares: length, optimiser schedule and bookkeeping intervals."""

    steps: int = Field(..., ge=0, description="Optimiser steps in all (a resumed run continues to this).")
    batch_size: int = Field(..., ge=1, description="Samples per step.")
    lr: float = Field(..., gt=0, description="Peak learning rate (AdamW).")
    lr_warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After warm-up: cosine decay to min_lr_ratio * lr, or constant.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; None = off.")
    train_samples: int | None = Field(
        None, ge=1, description="Use the first N training samples; None = the whole split (20k).")
    log_every: int = Field(25, ge=1, description="Write a metrics line every this many steps.")
    eval_every: int = Field(500, ge=1, description="Evaluate every this many steps (and at the end).")
    checkpoint_every: int = Field(250, ge=1, description="Save checkpoint.pt every this many steps (and at the end).")


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


class TeacherTrainSettings(_Schedule):
    """Stage ``teacher``: the text encoder and U-Net, trained jointly on cached VAE latents."""

    vae: UserPath | None = Field(
        None, description="A finished `vae` run directory (or an AutoencoderKL folder); None = an "
                          "untrained VAE (smoke tests only).")
    steps: int = Field(7000, ge=0, description="Optimiser steps in all.")
    batch_size: int = Field(64, ge=1, description="Samples per step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate of U-Net and text encoder.")
    lr_warmup_steps: int = Field(200, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (matrices only).")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="Decay of the EMA copy (warmed up as (1+k)/(10+k)).")
    caption_dropout: float = Field(
        0.1, ge=0, le=1,
        description="Fraction of captions replaced by the empty prompt (for classifier-free guidance).")
    tier_weights: dict[str, float] = Field(
        default_factory=lambda: {"easy": 1.0, "medium": 1.0, "hard": 1.5, "hardest": 1.5},
        description="Relative sampling weight of each difficulty tier.")
    snr_gamma: float | None = Field(
        5.0, gt=0, description="Min-SNR loss weighting gamma (Hang et al. 2023); None = plain MSE.")
    val_samples: int = Field(256, ge=1, description="Validation samples for the validation loss.")
    val_timesteps: list[int] = Field(
        default_factory=lambda: [100, 300, 500, 700, 900], description="Timesteps of the validation loss.")
    encode_batch_size: int = Field(250, ge=1, description="Images per VAE forward while caching latents.")
    samples_per_tier: int = Field(4, ge=0, description="Validation prompts per tier in the final samples.png.")
    sample_steps: int = Field(25, ge=1, description="PNDM steps for samples.png.")
    sample_guidance: float = Field(4.0, ge=0, description="Guidance scale for samples.png.")

    @field_validator("tier_weights")
    @classmethod
    def _check_tiers(cls, value: dict[str, float]) -> dict[str, float]:
        unknown, missing = sorted(set(value) - set(TIERS)), sorted(set(TIERS) - set(value))
        if unknown or missing:
            raise ValueError(f"must name exactly the tiers {list(TIERS)}; unknown {unknown}, missing {missing}")
        if any(w <= 0 for w in value.values()):
            raise ValueError(f"weights must be positive, got {value}")
        return value


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


class ToyTrainSettings(_Strict):
    """Settings of ``python -m aptp.train.toy``; a recipe fills the section of its stage."""

    seed: int = Field(0, description="Seed of initialisation and of every training step's randomness.")
    world_seed: int = Field(0, description="Seed of the shapes world (which images the splits hold).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")
    vae: VaeTrainSettings = Field(default_factory=VaeTrainSettings)
    teacher: TeacherTrainSettings = Field(default_factory=TeacherTrainSettings)
    clip: ClipTrainSettings = Field(default_factory=ClipTrainSettings)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def load_toy_settings(recipe: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                      base: dict[str, Any] | None = None) -> ToyTrainSettings:
    """Read a toy recipe, apply ``key=value`` overrides and validate once.

    Args:
        recipe: YAML file with the layout of :class:`ToyTrainSettings`; None = defaults.
        overrides: Dotted ``key=value`` strings (values parsed as YAML), e.g. ``teacher.lr=1e-4``.
        base: A settings dict to start from instead of the recipe (used on resume).

    Raises:
        SettingsError: One line listing every problem.
    """
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    source = "settings"
    if recipe is not None:
        path = Path(recipe).expanduser()
        source = f"recipe {path}"
        if not path.is_file():
            raise SettingsError(f"recipe {path}: not found; pass the path of a recipe YAML file (recipes/toy-*.yaml)")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SettingsError(f"recipe {path}: invalid YAML: {str(exc).splitlines()[0]}") from exc
        if data is not None and not isinstance(data, dict):
            raise SettingsError(f"recipe {path}: top level must be a mapping, got {type(data).__name__}")
        tree = data or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set teacher.lr=1e-4")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return ToyTrainSettings.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("extra_forbidden", "value_error", "missing"):
                msg += f", got {err['input']!r}"
            problems.append(f"{loc}: {msg}")
        n = len(problems)
        raise SettingsError(f"{source}: {n} problem{'s' if n != 1 else ''}: " + "; ".join(problems)) from None


# ----------------------------------------------------------------------------- helpers


def _generator(seed: int, stage: str, step: int) -> torch.Generator:
    """The generator of one training step: a pure function of (seed, stage, step)."""
    salt = int.from_bytes(hashlib.sha256(stage.encode()).digest()[:4], "little")
    state = np.random.SeedSequence([seed, salt, step]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _lr_factor(cfg: _Schedule, step: int) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warm-up, then cosine or constant."""
    if step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _adamw(modules: Sequence[torch.nn.Module], cfg: _Schedule) -> torch.optim.AdamW:
    # Decay matrices and convolution kernels only; norms, biases, embeddings' scales and
    # CLIP's logit scale are left alone, as is usual for transformers.
    decay, no_decay = [], []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def _render(world: ShapesWorld, split: str, n: int, start: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """Renders samples ``start .. start+n-1`` of a split: uint8 images (n, 3, 64, 64), captions, tiers."""
    images = torch.empty((n, 3, toy.RESOLUTION, toy.RESOLUTION), dtype=torch.uint8)
    captions, tiers = [], []
    for i in range(n):
        sample = world.sample(split, start + i)
        images[i] = torch.from_numpy(np.array(sample.image, dtype=np.uint8)).permute(2, 0, 1)
        captions.append(sample.caption)
        tiers.append(sample.tier)
    return images, captions, tiers


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 [0, 255] -> [-1, 1]


def _tier_ids(tiers: Sequence[str]) -> torch.Tensor:
    return torch.tensor([TIERS.index(t) for t in tiers], dtype=torch.long)


def _per_tier(values: torch.Tensor, tier_ids: torch.Tensor, name: str) -> dict[str, float]:
    out = {name: float(values.mean())}
    for i, tier in enumerate(TIERS):
        mask = tier_ids == i
        if mask.any():
            out[f"{name}/{tier}"] = float(values[mask].mean())
    return out


def _n_train(cfg: _Schedule, world: ShapesWorld) -> int:
    total = world.split_size("train")
    if cfg.train_samples is not None and cfg.train_samples > total:
        raise SettingsError(f"train_samples={cfg.train_samples} exceeds the train split ({total})")
    return total if cfg.train_samples is None else cfg.train_samples


def _n_val(n: int, world: ShapesWorld) -> int:
    total = world.split_size("validation")
    if n > total:
        raise SettingsError(f"val_samples={n} exceeds the validation split ({total})")
    return n


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _clip_grad(params: Sequence[torch.nn.Parameter], limit: float | None) -> float:
    if limit is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
    return float(torch.nn.utils.clip_grad_norm_(params, limit))


def _save_dir_atomically(write, dest: Path) -> Path:
    """Runs ``write(tmp_dir)`` and swaps the result in for ``dest`` (no half-written folder is ever at dest)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    old = dest.with_name(f".{dest.name}.old")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    write(tmp)
    for f in tmp.rglob("*"):  # some writers create files 0600
        if f.is_file():
            f.chmod(0o644)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    return dest


class _Output:
    """Progress lines on stdout and metrics lines in ``metrics.jsonl``."""

    def __init__(self, out: Path, stage: str, quiet: bool) -> None:
        self.path, self.stage, self.quiet = out / METRICS_FILE, stage, quiet

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"[{self.stage}] {text}", flush=True)

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        line = {"stage": self.stage, "kind": kind, "step": step, **values}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after ``step`` (work lost by an interrupted run), keeping the rest."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")


def _fmt(values: dict[str, float], keys: Sequence[str] | None = None) -> str:
    keys = list(values) if keys is None else [k for k in keys if k in values]
    parts = []
    for k in keys:
        v = values[k]
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- stages


class _Stage:
    """One trainable stage. Subclasses set up data and models in ``__init__``."""

    name: str

    def __init__(self, settings: ToyTrainSettings, out: Path, output: _Output) -> None:
        self.settings, self.out, self.output = settings, out, output
        self.cfg: _Schedule = getattr(settings, self.name)
        self.world = ShapesWorld(settings.world_seed)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        """Writes the stage's product; returns extra fields for result.json."""
        raise NotImplementedError

    def _set_lr(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.cfg.lr * _lr_factor(self.cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


class _VaeStage(_Stage):
    name = "vae"
    cfg: VaeTrainSettings

    def __init__(self, settings: ToyTrainSettings, out: Path, output: _Output) -> None:
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


class _TeacherStage(_Stage):
    name = "teacher"
    cfg: TeacherTrainSettings

    def __init__(self, settings: ToyTrainSettings, out: Path, output: _Output) -> None:
        from diffusers import DDPMScheduler

        super().__init__(settings, out, output)
        cfg = self.cfg
        torch.manual_seed(settings.seed)
        self.vae = self._load_vae(cfg.vae).eval().requires_grad_(False)
        self.tokenizer = toy.build_tokenizer()
        self.text_encoder = toy.build_text_encoder().train()
        self.unet = toy.build_unet().train()
        self.ema_text_encoder = copy.deepcopy(self.text_encoder).eval().requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)
        self.optimizer = _adamw([self.text_encoder, self.unet], cfg)
        self.params = [p for m in (self.text_encoder, self.unet) for p in m.parameters()]
        self.ema_params = [p for m in (self.ema_text_encoder, self.ema_unet) for p in m.parameters()]
        sched = toy.toy_scheduler_config()
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
            beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"],
            prediction_type=sched["prediction_type"], clip_sample=False, steps_offset=sched["steps_offset"])
        alphas = self.noise_scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)  # (T,)
        self.scaling = float(self.vae.config.scaling_factor)
        self._load_data()

    def _load_vae(self, path: Path | None):
        from diffusers import AutoencoderKL

        if path is None:
            self.output.say("WARNING: teacher.vae is not set; using an untrained VAE (smoke test only)")
            return toy.build_vae()
        for folder in (path / "vae", path):
            if (folder / "config.json").is_file():
                return AutoencoderKL.from_pretrained(folder, local_files_only=True)
        raise SettingsError(f"teacher.vae={path}: no AutoencoderKL there (expected {path}/vae/config.json "
                            f"from a finished `vae` run, or a config.json); run the vae stage first")

    def _vae_fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.vae.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().float().numpy().tobytes())
        h.update(repr(self.scaling).encode())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def _encode(self, split: str, n: int) -> dict[str, Any]:
        means, stds, captions, tiers = [], [], [], []
        for start in range(0, n, self.cfg.encode_batch_size):
            images, caps, trs = _render(self.world, split, min(self.cfg.encode_batch_size, n - start), start)
            dist = self.vae.encode(_to_float(images)).latent_dist
            means.append(dist.mean.half())  # (b, 4, 16, 16)
            stds.append(dist.std.half())
            captions += caps
            tiers += trs
        return {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions, "tiers": tiers}

    def _load_data(self) -> None:
        cfg = self.cfg
        n_train, n_val = _n_train(cfg, self.world), _n_val(cfg.val_samples, self.world)
        key = {"vae": self._vae_fingerprint(), "world_seed": self.settings.world_seed,
               "n_train": n_train, "n_val": n_val}
        cache = self.out / "latents.pt"
        data = torch.load(cache, map_location="cpu", weights_only=True) if cache.is_file() else None
        if data is None or data.get("key") != key:
            t0 = time.perf_counter()
            data = {"key": key, "train": self._encode("train", n_train),
                    "validation": self._encode("validation", n_val)}
            with atomic_path(cache) as tmp:
                torch.save(data, tmp)
            self.output.say(f"encoded {n_train} train + {n_val} validation images to latents in "
                            f"{time.perf_counter() - t0:.1f} s -> {cache}")
        else:
            self.output.say(f"using cached latents {cache}")
        train, val = data["train"], data["validation"]
        self.train_mean, self.train_std = train["mean"], train["std"]
        self.train_ids = self._tokenize(train["captions"])  # (N, L)
        weights = torch.tensor([cfg.tier_weights[t] for t in train["tiers"]], dtype=torch.float)
        self.train_weights = weights / weights.sum()
        self.val_latents = val["mean"].float() * self.scaling  # (V, 4, 16, 16), the posterior mode
        self.val_ids = self._tokenize(val["captions"])
        self.val_tiers = _tier_ids(val["tiers"])
        self.val_captions = val["captions"]
        self.empty_ids = self._tokenize([""])[0]  # (L,)

    def _tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def state_dict(self) -> dict[str, Any]:
        return {"text_encoder": _state(self.text_encoder), "unet": _state(self.unet),
                "ema_text_encoder": _state(self.ema_text_encoder), "ema_unet": _state(self.ema_unet),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("text_encoder", "unet", "ema_text_encoder", "ema_unet"):
            getattr(self, name).load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])

    def _loss_terms(self, text_encoder, unet, latents, ids, noise, t) -> torch.Tensor:
        """Per-sample v-prediction MSE (B,)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        target = self.noise_scheduler.get_velocity(latents, noise, t)
        cond = text_encoder(ids)[0]  # (B, L, 64)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample  # (B, 4, 16, 16)
        return (pred - target).pow(2).mean(dim=(1, 2, 3))

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        g = _generator(self.settings.seed, self.name, step)
        lr = self._set_lr(self.optimizer, step)
        idx = torch.multinomial(self.train_weights, cfg.batch_size, replacement=True, generator=g)
        mean, std = self.train_mean[idx].float(), self.train_std[idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling  # (B, 4, 16, 16)
        ids = self.train_ids[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout
        ids[drop] = self.empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        per_sample = self._loss_terms(self.text_encoder, self.unet, latents, ids, noise, t)
        if cfg.snr_gamma is not None:
            snr = self.snr[t]
            weights = snr.clamp(max=cfg.snr_gamma) / (snr + 1)  # min-SNR for v-prediction
            loss = (per_sample * weights).mean()
        else:
            loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = _clip_grad(self.params, cfg.grad_clip)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        return {"loss": loss.item(), "mse": per_sample.mean().item(), "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Unweighted v-MSE of the EMA models on fixed validation latents, noise and timesteps."""
        g = torch.Generator().manual_seed(self.settings.seed)
        losses = torch.zeros(len(self.val_latents))
        for t_value in self.cfg.val_timesteps:
            noise = torch.randn(self.val_latents.shape, generator=g)
            for sl in torch.split(torch.arange(len(self.val_latents)), 128):
                t = torch.full((len(sl),), t_value, dtype=torch.long)
                losses[sl] += self._loss_terms(self.ema_text_encoder, self.ema_unet, self.val_latents[sl],
                                               self.val_ids[sl], noise[sl], t)
        return _per_tier(losses / len(self.cfg.val_timesteps), self.val_tiers, "val_loss")

    @torch.no_grad()
    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        pipe = toy.build_toy_pipeline(vae=self.vae, text_encoder=copy.deepcopy(self.ema_text_encoder),
                                      unet=copy.deepcopy(self.ema_unet), scheduler="pndm")
        _save_dir_atomically(lambda d: pipe.save_pretrained(d, safe_serialization=True), self.out / "pipeline")
        self.output.say(f"wrote {self.out / 'pipeline'} (EMA weights)")
        extra: dict[str, Any] = {"product": "pipeline"}
        if self.cfg.samples_per_tier > 0:
            t0 = time.perf_counter()
            extra["samples"] = self._sample_grid(pipe)
            extra["sample_s"] = round(time.perf_counter() - t0, 2)
        return extra

    def _sample_grid(self, pipe) -> str:
        from PIL import Image

        k = self.cfg.samples_per_tier
        prompts, rows = [], []
        for tier in TIERS:
            picked = [c for c, t in zip(self.val_captions, self.val_tiers.tolist()) if TIERS[t] == tier][:k]
            if picked:  # a row per tier present in the validation subset, padded by repetition
                prompts += picked + [picked[-1]] * (k - len(picked))
                rows.append(tier)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompts, num_inference_steps=self.cfg.sample_steps, guidance_scale=self.cfg.sample_guidance,
                      generator=torch.Generator().manual_seed(self.settings.seed)).images
        size = toy.RESOLUTION
        grid = Image.new("RGB", (k * size, len(rows) * size))
        for i, image in enumerate(images):
            grid.paste(image, ((i % k) * size, (i // k) * size))
        with atomic_path(self.out / "samples.png") as tmp:
            grid.save(tmp, format="PNG")
        atomic_write_json(self.out / "samples.json", {"rows": rows, "prompts": prompts,
                                                      "steps": self.cfg.sample_steps,
                                                      "guidance": self.cfg.sample_guidance})
        return "samples.png"


class _ClipStage(_Stage):
    name = "clip"
    cfg: ClipTrainSettings

    def __init__(self, settings: ToyTrainSettings, out: Path, output: _Output) -> None:
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


_STAGE_CLASSES: dict[str, type[_Stage]] = {"vae": _VaeStage, "teacher": _TeacherStage, "clip": _ClipStage}


# ----------------------------------------------------------------------------- driver


def _prepare(stage: str, out: Path, recipe: Path | None, overrides: Sequence[str], steps: int | None,
             resume: bool, overwrite: bool) -> ToyTrainSettings:
    """Resolves the settings of a run and prepares its directory."""
    if resume and (out / SETTINGS_FILE).is_file():
        stored = yaml.safe_load((out / SETTINGS_FILE).read_text(encoding="utf-8"))
        settings = load_toy_settings(None, overrides, base=stored)
        if recipe is not None:
            fresh = load_toy_settings(recipe, overrides)
            a = getattr(fresh, stage).model_dump(exclude={"steps"})
            b = getattr(settings, stage).model_dump(exclude={"steps"})
            diff = sorted(k for k in a if a[k] != b[k])
            if diff or fresh.seed != settings.seed or fresh.world_seed != settings.world_seed:
                raise SettingsError(f"--resume: recipe {recipe} differs from {out / SETTINGS_FILE} in "
                                    f"{diff or ['seed/world_seed']}; drop --recipe to continue with the "
                                    "stored settings")
    else:
        if recipe is None:
            raise SettingsError("--recipe is required (e.g. --recipe recipes/toy-teacher.yaml)")
        settings = load_toy_settings(recipe, overrides)
    if steps is not None:
        if steps < 0:
            raise SettingsError(f"--steps must be >= 0, got {steps}")
        getattr(settings, stage).steps = steps
    prepare_output_dir(out, overwrite=overwrite, resume=resume)
    atomic_write_yaml(out / SETTINGS_FILE, settings.model_dump(mode="json"))
    atomic_write_json(out / "run-meta.json", {**run_metadata(), "stage": stage})
    return settings


def train_stage(stage: str, out: str | os.PathLike[str], *, recipe: str | os.PathLike[str] | None = None,
                overrides: Sequence[str] = (), steps: int | None = None, resume: bool = False,
                overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Trains one stage into a run directory (or continues it); the library entry point of the CLI.

    Args:
        stage: ``vae``, ``teacher`` or ``clip``.
        out: The run directory.
        recipe: Recipe YAML. Optional when resuming: the run's ``settings.yaml`` is then the
            source; a recipe given anyway must agree with it (``steps`` aside).
        overrides: Dotted ``key=value`` settings overrides. On resume they apply on top of the
            stored settings (a deliberate change, e.g. a lower ``lr``; recorded in metrics.jsonl).
        steps: Overrides the stage's ``steps`` (a resumed run can be extended this way).
        resume: Continue from ``out/checkpoint.pt`` (from step 0 if there is none yet).
        overwrite: Delete a non-empty ``out`` first.
        quiet: No progress lines on stdout.

    Returns:
        The content written to ``out/result.json``: final metrics, timings and the product folder.

    Raises:
        SettingsError / OutputExistsError: For bad settings or an existing run directory.
    """
    if stage not in _STAGE_CLASSES:
        raise SettingsError(f"unknown stage {stage!r}; expected one of {list(STAGES)}")
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    settings = _prepare(stage, out, None if recipe is None else Path(recipe), overrides, steps, resume, overwrite)
    cfg = getattr(settings, stage)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    output = _Output(out, stage, quiet)
    t_setup = time.perf_counter()
    runner = _STAGE_CLASSES[stage](settings, out, output)
    start, train_wall = 0, 0.0
    ckpt_path = out / CHECKPOINT_FILE
    if resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("stage") != stage:
            raise SettingsError(f"--resume: {ckpt_path} belongs to stage {ckpt.get('stage')!r}, not {stage!r}")
        runner.load_state_dict(ckpt["state"])
        start, train_wall = int(ckpt["step"]), float(ckpt["train_wall_s"])
        output.truncate_after(start)
        output.record("resume", start, {"overrides": list(overrides), "steps": cfg.steps})
        output.say(f"resumed from step {start} ({train_wall / 60:.1f} min of training so far)")
    setup_s = time.perf_counter() - t_setup
    output.record("setup", start, {"setup_s": round(setup_s, 2)})

    def save(step: int) -> None:
        t0 = time.perf_counter()
        with atomic_path(ckpt_path) as tmp:
            torch.save({"stage": stage, "step": step, "train_wall_s": train_wall,
                        "settings": settings.model_dump(mode="json"), "state": runner.state_dict()}, tmp)
        logger.debug("checkpoint at step %d in %.2f s", step, time.perf_counter() - t0)

    output.say(f"training steps {start} -> {cfg.steps} (setup {setup_s:.1f} s)")
    window: list[dict[str, float]] = []
    window_s = 0.0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        values = runner.train_step(step)
        dt = time.perf_counter() - t0
        train_wall += dt
        window.append(values)
        window_s += dt
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            mean = {k: float(np.mean([v[k] for v in window])) for k in window[0]}
            mean["lr"] = values["lr"]
            step_s = window_s / len(window)
            eta_min = (cfg.steps - done) * step_s / 60
            output.record("train", done, {**mean, "step_s": round(step_s, 4), "train_wall_s": round(train_wall, 2)})
            output.say(f"step {done}/{cfg.steps} {_fmt(mean, ['loss', 'lr'])} {step_s:.3f} s/step "
                       f"eta {eta_min:.1f} min")
            window, window_s = [], 0.0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done)
        if done % cfg.eval_every == 0 and done != cfg.steps:
            t_eval = time.perf_counter()
            metrics = runner.evaluate()
            output.record("eval", done, {**metrics, "eval_s": round(time.perf_counter() - t_eval, 2)})
            output.say(f"eval at {done}: {_fmt(metrics)}")
    if start >= cfg.steps and not ckpt_path.is_file():
        save(cfg.steps)  # a zero-step run still leaves a resumable checkpoint
    t_eval = time.perf_counter()
    metrics = runner.evaluate()
    output.record("eval", cfg.steps, {**metrics, "eval_s": round(time.perf_counter() - t_eval, 2)})
    output.say(f"final eval: {_fmt(metrics)}")
    extra = runner.finish(metrics)
    # train_wall_s adds up the optimiser steps of every invocation (resumes included);
    # invocation_wall_s is this call from start to end: setup, evaluations and product included.
    result = {"stage": stage, "steps": cfg.steps, "train_wall_s": round(train_wall, 2),
              "train_wall_min": round(train_wall / 60, 2),
              "invocation_wall_s": round(time.perf_counter() - t_start, 2), "metrics": metrics, **extra}
    atomic_write_json(out / RESULT_FILE, result)
    output.say(f"done: {cfg.steps} steps, {train_wall / 60:.1f} min of training")
    return result


# ----------------------------------------------------------------------------- export


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def export_assets(teacher: str | os.PathLike[str], clip: str | os.PathLike[str] | None = None,
                  dest: str | os.PathLike[str] | None = None) -> dict[str, int]:
    """Writes the trained toy pipeline and domain CLIP, in float16, as the package's shipped assets.

    Args:
        teacher: A finished ``teacher`` run directory (with ``pipeline/``) or a pipeline folder.
        clip: A finished ``clip`` run directory (with ``domain-clip/``) or such a folder; None = skip.
        dest: The assets root; None = ``aptp/models/assets``. ``toy/`` and ``domain-clip/`` inside it
            are replaced as a whole.

    Returns:
        Bytes written per asset folder.

    Raises:
        ModelNotFoundError: If a source holds no finished product.
    """
    root = toy.toy_assets_dir().parent if dest is None else Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    teacher = Path(teacher)
    source = teacher / "pipeline" if (teacher / "pipeline" / "model_index.json").is_file() else teacher
    pipe = toy.load_toy_pipeline(dtype=torch.float16, folder=source)
    _save_dir_atomically(lambda d: pipe.save_pretrained(d, safe_serialization=True), root / "toy")
    sizes["toy"] = _folder_bytes(root / "toy")
    if clip is not None:
        clip = Path(clip)
        source = clip / "domain-clip" if (clip / "domain-clip" / "open_clip_config.json").is_file() else clip
        model, _, _ = toy.load_domain_clip(source)
        _save_dir_atomically(lambda d: toy.save_domain_clip(model, d, dtype=torch.float16), root / "domain-clip")
        sizes["domain-clip"] = _folder_bytes(root / "domain-clip")
    return sizes


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aptp.train.toy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for stage in STAGES:
        s = sub.add_parser(stage, help=f"train the {stage} stage")
        s.add_argument("--recipe", type=Path, help="recipe YAML (recipes/toy-*.yaml)")
        s.add_argument("--output", type=Path, required=True, help="run directory")
        s.add_argument("--steps", type=int, help="override the number of steps")
        mode = s.add_mutually_exclusive_group()
        mode.add_argument("--resume", action="store_true", help="continue the run in --output")
        mode.add_argument("--overwrite", action="store_true", help="delete a non-empty --output first")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. teacher.lr=1e-4 (repeatable)")
        s.add_argument("--quiet", action="store_true", help="no progress lines")
    e = sub.add_parser("export", help="write trained weights (float16) into the package's assets")
    e.add_argument("--teacher", type=Path, required=True, help="finished teacher run directory")
    e.add_argument("--clip", type=Path, help="finished clip run directory")
    e.add_argument("--output", type=Path, help="assets root (default: aptp/models/assets)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.stage == "export":
            sizes = export_assets(args.teacher, args.clip, args.output)
            for name, size in sizes.items():
                print(f"{name}: {size / 2**20:.2f} MiB")
            print(f"total: {sum(sizes.values()) / 2**20:.2f} MiB")
        else:
            train_stage(args.stage, args.output, recipe=args.recipe, overrides=args.overrides, steps=args.steps,
                        resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except AptpUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
