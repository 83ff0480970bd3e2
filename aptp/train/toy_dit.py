"""Train a toy diffusion-transformer teacher (``toy-dit``) of the shapes world.

A stock diffusers :class:`~diffusers.PixArtTransformer2DModel` in a stock
:class:`~diffusers.PixArtAlphaPipeline`, reusing the shipped ``toy`` VAE, text encoder and
tokenizer **frozen** (caption channels 64, text length 24), so the transformer is the only
trained part::

    python -m aptp.train.toy_dit train  --recipe aptp/recipes/toy-dit-teacher.yaml --output runs/toy-dit-teacher
    python -m aptp.train.toy_dit export --teacher runs/toy-dit-teacher [--output aptp/models/assets/toy-dit]

``train`` takes ``--steps``, ``--resume``, ``--overwrite``, ``--set dit.lr=1e-4`` and ``--quiet`` like
``python -m aptp.train.toy``; its run directory has the same layout (``settings.yaml``,
``run-meta.json``, ``metrics.jsonl``, ``checkpoint.pt``, ``latents.pt``, ``result.json``) with
``pipeline/`` (the EMA transformer in a complete ``PixArtAlphaPipeline`` folder, float32) and
``samples.png``. ``export`` writes the EMA transformer in float16 next to byte-identical copies of
the toy's ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` (PNDM, v-prediction); a run
that has not finished yet is exported from the EMA weights of its latest ``checkpoint.pt``.

Sampling needs ``max_sequence_length=24`` (the text encoder has 24 positions) and
``use_resolution_binning=False`` (PixArt's bins exist only for its own sample sizes)::

    pipe = PixArtAlphaPipeline.from_pretrained("aptp/models/assets/toy-dit")
    pipe("a red circle", max_sequence_length=24, use_resolution_binning=False, guidance_scale=4.5)

Training reuses :mod:`aptp.train.toy`'s teacher stage (the latent cache, EMA, sample grid) and
:mod:`aptp.train.toy_common` (settings bases and recipe loader, step generators, LR schedule, AdamW
groups, the resumable training loop with atomic checkpoints, output lines, CLI options).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import Field

from aptp.errors import AptpUserError, ModelNotFoundError, SettingsError
from aptp.io import atomic_write_json, atomic_write_yaml, prepare_output_dir, run_metadata
from aptp.models import toy
from aptp.train import toy as base
from aptp.train import toy_common as common
from aptp.train.toy_common import UserPath

logger = logging.getLogger(__name__)

__all__ = ["DitTrainSettings", "ToyDitSettings", "build_transformer", "export_dit", "load_dit_settings",
           "main", "train_dit"]

STAGE = "dit"
TEXT_LENGTH = toy.MAX_LENGTH  # 24: the toy text encoder's positions
PIPE_KWARGS: dict[str, Any] = {"max_sequence_length": TEXT_LENGTH, "use_resolution_binning": False,
                               "clean_caption": False}
COPIED = ("vae", "text_encoder", "tokenizer", "scheduler")  # taken over from the toy pipeline unchanged


# ----------------------------------------------------------------------------- settings


class DitTrainSettings(base.TeacherTrainSettings):
    """Section ``dit``: the transformer's size and its training (the rest as the toy teacher's)."""

    vae: UserPath | None = Field(
        None, description="The toy pipeline folder whose vae/, text_encoder/ and tokenizer/ are reused frozen; "
                          "None = the shipped toy (aptp/models/assets/toy).")
    num_layers: int = Field(8, ge=1, description="Transformer blocks.")
    num_attention_heads: int = Field(6, ge=1, description="Attention heads per block (self and cross).")
    attention_head_dim: int = Field(32, ge=1, description="Channels per head; hidden size = heads * head dim.")
    patch_size: int = Field(2, ge=1, description="Latent patch side (16x16 latents -> (16/p)^2 tokens).")
    steps: int = Field(6500, ge=0, description="Optimiser steps in all.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the transformer.")
    lr_warmup_steps: int = Field(300, ge=0, description="Linear warm-up steps.")


class ToyDitSettings(common._Strict):
    """Settings of ``python -m aptp.train.toy_dit train``."""

    seed: int = Field(0, description="Seed of initialisation and of every training step's randomness.")
    world_seed: int = Field(0, description="Seed of the shapes world (which images the splits hold).")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None = torch's default.")
    dit: DitTrainSettings = Field(default_factory=DitTrainSettings)


def load_dit_settings(recipe: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                      stored: dict[str, Any] | None = None) -> ToyDitSettings:
    """Reads a recipe (or a stored settings dict), applies ``key=value`` overrides, validates once."""
    return common.load_settings(ToyDitSettings, recipe, overrides, stored,
                                example="aptp/recipes/toy-dit-teacher.yaml", set_example="dit.lr=1e-4")


def _toy_folder(cfg: DitTrainSettings) -> Path:
    folder = toy.toy_assets_dir() if cfg.vae is None else Path(cfg.vae)
    if not (folder / "vae" / "config.json").is_file() or not (folder / "text_encoder" / "config.json").is_file():
        raise SettingsError(f"dit.vae={folder}: expected a toy pipeline folder with vae/, text_encoder/ and "
                            "tokenizer/ (e.g. aptp/models/assets/toy)")
    return folder


def build_transformer(cfg: DitTrainSettings, seed: int | None = 0):
    """A randomly initialised ``PixArtTransformer2DModel`` of the given size for 4x16x16 toy latents."""
    from diffusers import PixArtTransformer2DModel

    width = cfg.num_attention_heads * cfg.attention_head_dim
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return PixArtTransformer2DModel(
            num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
            in_channels=4, out_channels=4, num_layers=cfg.num_layers, cross_attention_dim=width,
            sample_size=toy.LATENT_SIZE, patch_size=cfg.patch_size, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
            norm_eps=1e-6, caption_channels=toy.toy_text_encoder_config()["hidden_size"],
            use_additional_conditions=False)


def _assemble(transformer, folder: Path, dtype: torch.dtype = torch.float32):
    """A ``PixArtAlphaPipeline`` of ``transformer`` and the toy pipeline's frozen parts in ``folder``."""
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PNDMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True),
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, local_files_only=True),
        transformer=transformer.to(dtype).eval(),
        scheduler=PNDMScheduler.from_pretrained(folder / "scheduler", local_files_only=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _save_pipeline(pipe, folder: Path, dest: Path) -> None:
    """Saves ``pipe`` and puts byte-identical copies of the toy's frozen parts in place of its own."""
    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in COPIED:
            shutil.rmtree(tmp / name, ignore_errors=True)
            shutil.copytree(folder / name, tmp / name)
    common._save_dir_atomically(write, dest)


class _Call:
    """Lets :meth:`aptp.train.toy._TeacherStage._sample_grid` drive a PixArt pipeline (text length 24)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    def set_progress_bar_config(self, **kwargs) -> None:
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, **PIPE_KWARGS, **kwargs)


# ----------------------------------------------------------------------------- the stage


class _DitStage(base._TeacherStage):
    """The toy teacher stage with a PixArt transformer in place of text encoder + U-Net (frozen text encoder)."""

    name = STAGE
    cfg: DitTrainSettings

    def __init__(self, settings: ToyDitSettings, out: Path, output: common._Output) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import AutoTokenizer, CLIPTextModel

        common._Stage.__init__(self, settings, out, output)
        cfg = self.cfg
        self.folder = _toy_folder(cfg)
        self.vae = AutoencoderKL.from_pretrained(self.folder / "vae", local_files_only=True)
        self.vae.eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder / "tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(self.folder / "text_encoder", dtype=torch.float32,
                                                          local_files_only=True).eval().requires_grad_(False)
        self.transformer = build_transformer(cfg, settings.seed).train()
        self.ema_transformer = copy.deepcopy(self.transformer).eval().requires_grad_(False)
        self.optimizer = common._adamw([self.transformer], cfg)
        self.params = list(self.transformer.parameters())
        self.ema_params = list(self.ema_transformer.parameters())
        sched = json.loads((self.folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
            beta_end=sched["beta_end"], beta_schedule=sched["beta_schedule"],
            prediction_type=sched["prediction_type"], clip_sample=False, steps_offset=sched["steps_offset"])
        alphas = self.noise_scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)  # (T,)
        self.scaling = float(self.vae.config.scaling_factor)
        self._load_data()  # the teacher's: cached latents, token ids, tier weights, validation set
        self.pad_id = self.tokenizer.pad_token_id
        n = sum(p.numel() for p in self.params)
        output.say(f"PixArtTransformer2DModel: {cfg.num_layers} blocks x {cfg.num_attention_heads} heads x "
                   f"{cfg.attention_head_dim} (hidden {cfg.num_attention_heads * cfg.attention_head_dim}), "
                   f"{n / 1e6:.2f}M parameters ({n * 2 / 2**20:.1f} MiB in float16)")

    def state_dict(self) -> dict[str, Any]:
        return {"transformer": common._state(self.transformer), "ema_transformer": common._state(self.ema_transformer),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.transformer.load_state_dict(state["transformer"])
        self.ema_transformer.load_state_dict(state["ema_transformer"])
        self.optimizer.load_state_dict(state["optimizer"])

    @torch.no_grad()
    def _text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen caption embeddings (B, 24, 64) and the attention mask the pipeline computes (B, 24)."""
        mask = (ids != self.pad_id).long()
        return self.text_encoder(ids, attention_mask=mask)[0], mask

    def _loss_terms(self, transformer, latents, ids, noise, t) -> torch.Tensor:  # type: ignore[override]
        """Per-sample MSE (B,) on the scheduler's target (v for v-prediction)."""
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        cond, mask = self._text(ids)
        pred = transformer(noisy, encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=t,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return (pred - target).pow(2).mean(dim=(1, 2, 3))

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        g = common._generator(self.settings.seed, self.name, step)
        lr = self._set_lr(self.optimizer, step)
        idx = torch.multinomial(self.train_weights, cfg.batch_size, replacement=True, generator=g)
        mean, std = self.train_mean[idx].float(), self.train_std[idx].float()
        latents = (mean + std * torch.randn(mean.shape, generator=g)) * self.scaling  # (B, 4, 16, 16)
        ids = self.train_ids[idx].clone()
        ids[torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout] = self.empty_ids
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        per_sample = self._loss_terms(self.transformer, latents, ids, noise, t)
        if cfg.snr_gamma is not None:
            snr = self.snr[t]
            loss = (per_sample * snr.clamp(max=cfg.snr_gamma) / (snr + 1)).mean()  # min-SNR for v-prediction
        else:
            loss = per_sample.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = common._clip_grad(self.params, cfg.grad_clip)
        self.optimizer.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)
        return {"loss": loss.item(), "mse": per_sample.mean().item(), "grad_norm": grad_norm, "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Unweighted MSE of the EMA transformer on fixed validation latents, noise and timesteps."""
        g = torch.Generator().manual_seed(self.settings.seed)
        losses = torch.zeros(len(self.val_latents))
        for t_value in self.cfg.val_timesteps:
            noise = torch.randn(self.val_latents.shape, generator=g)
            for sl in torch.split(torch.arange(len(self.val_latents)), 128):
                t = torch.full((len(sl),), t_value, dtype=torch.long)
                losses[sl] += self._loss_terms(self.ema_transformer, self.val_latents[sl], self.val_ids[sl],
                                               noise[sl], t)
        return common._per_tier(losses / len(self.cfg.val_timesteps), self.val_tiers, "val_loss")

    @torch.no_grad()
    def finish(self, metrics: dict[str, float]) -> dict[str, Any]:
        pipe = _assemble(copy.deepcopy(self.ema_transformer), self.folder)
        _save_pipeline(pipe, self.folder, self.out / "pipeline")
        self.output.say(f"wrote {self.out / 'pipeline'} (EMA transformer)")
        extra: dict[str, Any] = {"product": "pipeline"}
        if self.cfg.samples_per_tier > 0:
            t0 = time.perf_counter()
            extra["samples"] = self._sample_grid(_Call(pipe))
            extra["sample_s"] = round(time.perf_counter() - t0, 2)
        return extra


# ----------------------------------------------------------------------------- driver


def train_dit(out: str | os.PathLike[str], *, recipe: str | os.PathLike[str] | None = None,
              overrides: Sequence[str] = (), steps: int | None = None, resume: bool = False,
              overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Trains (or continues) the DiT teacher in run directory ``out``; returns ``result.json``'s content.

    The same contract as :func:`aptp.train.toy.train_stage`: on ``resume`` the stored
    ``settings.yaml`` is the source (``steps`` and ``overrides`` may change it), and step ``k``
    draws the same batch, noise and timesteps whether or not the run was interrupted.
    """
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    if resume and (out / common.SETTINGS_FILE).is_file():
        stored = yaml.safe_load((out / common.SETTINGS_FILE).read_text(encoding="utf-8"))
        settings = load_dit_settings(None, overrides, stored=stored)
        if recipe is not None:
            fresh = load_dit_settings(recipe, overrides)
            if fresh.model_dump(exclude={"dit": {"steps"}}) != settings.model_dump(exclude={"dit": {"steps"}}):
                raise SettingsError(f"--resume: recipe {recipe} differs from {out / common.SETTINGS_FILE}; drop "
                                    "--recipe to continue with the stored settings")
    elif recipe is None:
        raise SettingsError("--recipe is required (e.g. --recipe aptp/recipes/toy-dit-teacher.yaml)")
    else:
        settings = load_dit_settings(recipe, overrides)
    cfg = settings.dit
    if steps is not None:
        if steps < 0:
            raise SettingsError(f"--steps must be >= 0, got {steps}")
        cfg.steps = steps
    prepare_output_dir(out, overwrite=overwrite, resume=resume)
    atomic_write_yaml(out / common.SETTINGS_FILE, settings.model_dump(mode="json"))
    atomic_write_json(out / "run-meta.json", {**run_metadata(), "stage": STAGE})
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    output = common._Output(out, STAGE, quiet)
    t_setup = time.perf_counter()
    runner = _DitStage(settings, out, output)
    return common.run_stage(runner, stage=STAGE, out=out, settings=settings, cfg=cfg, output=output,
                            overrides=overrides, resume=resume, t_start=t_start, t_setup=t_setup)


# ----------------------------------------------------------------------------- export


def export_dit(teacher: str | os.PathLike[str], dest: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Writes the EMA transformer (float16) and the toy's frozen parts as a ``PixArtAlphaPipeline`` folder.

    Args:
        teacher: A ``train`` run directory: its finished ``pipeline/``, else the EMA weights of its
            latest ``checkpoint.pt`` (a run still training); or a PixArt pipeline folder.
        dest: The folder to (re)write; None = ``aptp/models/assets/toy-dit``.

    Returns:
        ``{"source", "step", "bytes", "transformer_bytes"}``.

    Raises:
        ModelNotFoundError: If ``teacher`` holds neither a pipeline nor a checkpoint.
    """
    from diffusers import PixArtTransformer2DModel

    teacher = Path(teacher).expanduser()
    dest = toy.toy_assets_dir().parent / "toy-dit" if dest is None else Path(dest).expanduser()
    pipeline = teacher / "pipeline" if (teacher / "pipeline" / "model_index.json").is_file() else teacher
    step: int | None = None
    if (pipeline / "model_index.json").is_file():
        transformer = PixArtTransformer2DModel.from_pretrained(pipeline / "transformer", local_files_only=True)
        folder = pipeline  # a pipeline folder always holds its vae/, text_encoder/, tokenizer/ and scheduler/
        source = str(pipeline)
    elif (teacher / common.CHECKPOINT_FILE).is_file():
        ckpt = torch.load(teacher / common.CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        cfg = load_dit_settings(None, stored=ckpt["settings"]).dit
        transformer = build_transformer(cfg, seed=None)
        transformer.load_state_dict(ckpt["state"]["ema_transformer"])
        folder, step, source = _toy_folder(cfg), int(ckpt["step"]), f"{teacher / common.CHECKPOINT_FILE} (EMA)"
    else:
        raise ModelNotFoundError(f"{teacher}: no pipeline/ and no {common.CHECKPOINT_FILE}; train it with "
                                 "`python -m aptp.train.toy_dit train --recipe aptp/recipes/toy-dit-teacher.yaml`")
    pipe = _assemble(transformer, folder, dtype=torch.float16)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _save_pipeline(pipe, folder, dest)
    return {"source": source, "step": step, "bytes": common._folder_bytes(dest),
            "transformer_bytes": common._folder_bytes(dest / "transformer")}


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aptp.train.toy_dit", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    common.add_train_arguments(sub.add_parser("train", help="train the PixArt transformer"),
                               "aptp/recipes/toy-dit-teacher.yaml", "dit.lr=1e-4")
    e = sub.add_parser("export", help="write the EMA transformer (float16) as a PixArtAlphaPipeline folder")
    e.add_argument("--teacher", type=Path, required=True, help="train run directory")
    e.add_argument("--output", type=Path, help="pipeline folder (default: aptp/models/assets/toy-dit)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            info = export_dit(args.teacher, args.output)
            at = "" if info["step"] is None else f" at step {info['step']}"
            print(f"exported {info['source']}{at}: transformer {info['transformer_bytes'] / 2**20:.2f} MiB, "
                  f"folder {info['bytes'] / 2**20:.2f} MiB")
        else:
            train_dit(args.output, recipe=args.recipe, overrides=args.overrides, steps=args.steps,
                      resume=args.resume, overwrite=args.overwrite, quiet=args.quiet)
    except AptpUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
