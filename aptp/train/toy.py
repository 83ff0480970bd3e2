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
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field, field_validator

from aptp.data.shapes import TIERS
from aptp.errors import AptpUserError, SettingsError
from aptp.io import (
    atomic_path,
    atomic_write_json,
    atomic_write_yaml,
    prepare_output_dir,
    run_metadata,
)
from aptp.models import toy
from aptp.train.toy_clip import ClipTrainSettings, _ClipStage
from aptp.train.toy_common import (  # noqa: F401  (CHECKPOINT_FILE .. UserPath: names of this module's API)
    CHECKPOINT_FILE,
    METRICS_FILE,
    RESULT_FILE,
    SETTINGS_FILE,
    UserPath,
    _adamw,
    _clip_grad,
    _folder_bytes,
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
    _Strict,
    _tier_ids,
    _to_float,
    add_train_arguments,
    load_settings,
    run_stage,
)
from aptp.train.toy_vae import VaeTrainSettings, _VaeStage

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

# ----------------------------------------------------------------------------- settings


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


class ToyTrainSettings(_Strict):
    """Settings of ``python -m aptp.train.toy``; a recipe fills the section of its stage."""

    seed: int = Field(0, description="Seed of initialisation and of every training step's randomness.")
    world_seed: int = Field(0, description="Seed of the shapes world (which images the splits hold).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")
    vae: VaeTrainSettings = Field(default_factory=VaeTrainSettings)
    teacher: TeacherTrainSettings = Field(default_factory=TeacherTrainSettings)
    clip: ClipTrainSettings = Field(default_factory=ClipTrainSettings)



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
    return load_settings(ToyTrainSettings, recipe, overrides, base)


# ----------------------------------------------------------------------------- stages


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
    return run_stage(runner, stage=stage, out=out, settings=settings, cfg=cfg, output=output,
                     overrides=overrides, resume=resume, t_start=t_start, t_setup=t_setup)


# ----------------------------------------------------------------------------- export



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
        add_train_arguments(sub.add_parser(stage, help=f"train the {stage} stage"), "recipes/toy-*.yaml",
                            "teacher.lr=1e-4")
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
