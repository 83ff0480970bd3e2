"""Routed, grouped, batch-parallel generation (``aptp generate``).

Every prompt is routed to an expert; prompts are grouped per expert and each group runs in
batches through ONE pipeline whose VAE, text encoder(s) and scheduler are loaded once — only the
denoiser is swapped (the pipeline's ``unet`` or ``transformer``: experts are stock diffusers
models, so a stock ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``,
``PixArtAlphaPipeline``, ... computes its own conditioning). Each prompt's starting noise comes from its own seed, so its image depends only
on (prompt, seed, expert), never on which prompts share its batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aptp.engine.expert import load_expert
from aptp.experts import route_prompts
from aptp.io import atomic_write_bytes, atomic_write_text
from aptp.rundir import RunDir
from aptp.settings import GenerateSettings

logger = logging.getLogger(__name__)


@dataclass
class Job:
    index: int
    prompt: str
    expert: int | None  # None = the full teacher
    seed: int


def generation_size(s, g=None) -> tuple[int, int]:
    """(height, width) a run generates at: ``g``'s (e.g. flags on top of the run's settings), else
    the run's ``generate`` size, else its deployment (MACs) resolution, else its training one."""
    res = s.space.macs_resolution or s.data.resolution
    g = g or s.generate
    return g.height or s.generate.height or res, g.width or s.generate.width or res


def make_scheduler(pipe, name: str):
    """The sampling scheduler ``name`` (``pndm``, ``ddim``, or ``default``: the pipeline's own)
    with the pipeline scheduler's config.

    Raises:
        AptpUserError: a DDPM-family scheduler asked of a flow-matching pipeline (SD3, Flux).
    """
    from diffusers import DDIMScheduler, PNDMScheduler

    from aptp.errors import AptpUserError
    from aptp.train.diffusion import is_flow_matching

    if name == "default":
        return type(pipe.scheduler).from_config(pipe.scheduler.config)
    if is_flow_matching(pipe.scheduler):
        raise AptpUserError(f"generate.scheduler {name!r}: this model samples with "
                            f"{type(pipe.scheduler).__name__} (flow matching); use --scheduler default")
    cls = {"pndm": PNDMScheduler, "ddim": DDIMScheduler}[name]
    return cls.from_config(pipe.scheduler.config)


def denoiser_of(pipe) -> torch.nn.Module:
    """The pipeline's U-Net or transformer."""
    from aptp.models.registry import denoiser_of as of

    return of(pipe)


def initial_latents(pipe, seed: int, height: int, width: int) -> torch.Tensor:
    """(1, ...) starting noise of one prompt as the pipeline takes it, a function of its seed only."""
    from aptp.engine.backbones import backbone_for

    model = denoiser_of(pipe)
    return backbone_for(model).initial_latents(model.config, seed, height, width, int(pipe.vae_scale_factor))


class ExpertPipeline:
    """A loaded teacher pipeline plus lazily loaded experts (cached, at most ``cache`` at once)."""

    def __init__(self, run: RunDir | None, pipe, weights: str = "auto", cache: int = 16, model: str | None = None):
        from aptp.engine.backbones import backbone_for
        from aptp.models.registry import default_guidance

        self.run = run
        # guidance when the settings leave it unset: the model's recommended scale
        self.default_guidance = default_guidance(model or (run.settings.model.name if run is not None else None))
        self.pipe = pipe
        self.teacher_denoiser = denoiser_of(pipe)
        self.backbone = backbone_for(self.teacher_denoiser)
        self.component = self.backbone.component  # the pipeline attribute swapped per expert
        self.call_kwargs = self.backbone.call_kwargs(pipe, self.backbone.text_len(pipe))
        self.weights = weights
        self.cache = cache
        self._experts: dict[int, torch.nn.Module] = {}

    def denoiser(self, expert: int | None) -> torch.nn.Module:
        """The teacher's denoiser (``None``) or expert ``expert``'s, loaded once and kept (``cache`` of them)."""
        if expert is None:
            return self.teacher_denoiser
        if expert not in self._experts:
            if len(self._experts) >= self.cache:
                self._experts.pop(next(iter(self._experts)))
            m = load_expert(self.run.expert_dir(expert, self.weights), device=self.teacher_denoiser.device,
                            dtype=self.teacher_denoiser.dtype)
            self._experts[expert] = m
        return self._experts[expert]

    def guidance(self, g: GenerateSettings) -> float:
        """The guidance scale ``render`` uses for settings ``g``."""
        return g.guidance if g.guidance is not None else self.default_guidance

    @torch.no_grad()
    def render(self, jobs: list[Job], g: GenerateSettings, height: int, width: int,
               on_batch: Callable[[int], None] | None = None,
               on_images: Callable[[list[Job], list[Any]], None] | None = None) -> dict[int, Any]:
        """Images (PIL) of ``jobs``, keyed by job index; grouped per expert, batched.

        ``on_images(batch_jobs, images)`` is called as soon as each batch is done (to write it
        out), then ``on_batch(len(batch))`` (progress). With ``on_images`` the images are handed
        over and not kept: the result is then empty, so memory does not grow with the jobs."""
        from aptp.schedulers import check_scheduler_steps

        pipe = self.pipe
        pipe.scheduler = make_scheduler(pipe, g.scheduler)
        check_scheduler_steps(pipe.scheduler, g.steps)  # one line, not a crash inside diffusers
        groups: dict[int | None, list[Job]] = {}
        for j in jobs:
            groups.setdefault(j.expert, []).append(j)
        images: dict[int, Any] = {}
        order = sorted(groups, key=lambda k: -1 if k is None else k)
        for k in order:
            model = self.denoiser(k)
            setattr(pipe, self.component, model)
            group = groups[k]
            for start in range(0, len(group), g.batch_size):
                batch = group[start : start + g.batch_size]
                latents = torch.cat([initial_latents(pipe, j.seed, height, width) for j in batch])
                out = pipe([j.prompt for j in batch], height=height, width=width, num_inference_steps=g.steps,
                           guidance_scale=self.guidance(g), latents=latents.to(pipe.device, model.dtype),
                           **self.call_kwargs)
                if on_images is not None:
                    on_images(batch, list(out.images))
                else:
                    images.update((j.index, img) for j, img in zip(batch, out.images))
                if on_batch is not None:
                    on_batch(len(batch))
        setattr(pipe, self.component, self.teacher_denoiser)
        return images


def plan_jobs(run: RunDir | None, prompts: list[str], seed: int, expert: int | None, full: bool) -> list[Job]:
    """Route prompts (unless forced) and give prompt ``i`` the seed ``seed + i``."""
    if full or run is None:
        experts = [None] * len(prompts)
    elif expert is not None:
        experts = [expert] * len(prompts)
    else:
        experts = [r["expert"] for r in route_prompts(run, prompts)]
    return [Job(i, p, e, seed + i) for i, (p, e) in enumerate(zip(prompts, experts))]


def generate(run: RunDir, prompts: list[str], out_dir: Path, g: GenerateSettings, *, expert: int | None = None,
             full: bool = False, weights: str = "auto", pipe=None,
             on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Generate one image per prompt into ``out_dir`` with ``manifest.jsonl`` in input order.

    Each batch's PNGs and manifest lines are written as soon as the batch is done (lines in
    completion order while running); when every prompt is done the manifest is rewritten in
    input order. An interrupted run keeps every finished image and its line.
    """
    import io
    import json
    import os

    from aptp.errors import AptpUserError
    from aptp.train.teacher import load_teacher

    s = run.settings
    if expert is not None:
        n = len(run.experts())
        if not 0 <= expert < n:
            raise AptpUserError(f"--expert {expert}: the run has experts 0..{n - 1}")
    if pipe is None:
        pipe = load_teacher(s.model).pipeline
    height, width = generation_size(s, g)
    jobs = plan_jobs(run, prompts, g.seed, expert, full)
    ep = ExpertPipeline(run, pipe, weights=weights)
    ratios = {e["expert"]: e["macs_ratio"] for e in run.experts()} if run.experts_json.is_file() else {}
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.jsonl"
    atomic_write_text(manifest_path, "")  # a fresh manifest (the folder was checked by the caller)
    records: dict[int, dict[str, Any]] = {}

    def record(j: Job) -> dict[str, Any]:
        return {"index": j.index, "prompt": j.prompt, "expert": "full" if j.expert is None else j.expert,
                "macs_ratio": 1.0 if j.expert is None else ratios.get(j.expert), "seed": j.seed,
                "file": f"{j.index:05d}.png", "height": height, "width": width, "steps": g.steps,
                "guidance": ep.guidance(g), "scheduler": g.scheduler}

    def write_batch(batch: list[Job], imgs: list[Any]) -> None:
        # each finished batch is on disk at once: PNGs first, then their manifest lines, so an
        # interrupted run keeps every finished image and a line for each
        for j, img in zip(batch, imgs):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(out_dir / f"{j.index:05d}.png", buf.getvalue())
        with open(manifest_path, "a") as fh:
            for j in batch:
                records[j.index] = record(j)
                fh.write(json.dumps(records[j.index]) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    t0 = time.time()
    ep.render(jobs, g, height, width, on_batch=on_batch, on_images=write_batch)
    seconds = time.time() - t0
    manifest = [records[j.index] for j in jobs]
    # complete: rewrite the manifest in input order
    atomic_write_text(manifest_path, "".join(json.dumps(m) + "\n" for m in manifest))
    logger.info("%d images in %.1f s", len(jobs), seconds)
    return manifest
