"""Scaffolding shared by the toy trainers (:mod:`aptp.train.toy` and :mod:`aptp.train.toy_dit`).

Settings bases and their recipe loader, the per-step generators, the learning-rate schedule,
AdamW groups, shapes rendering, atomic folder writes, progress/metrics output, the ``_Stage``
interface and :func:`run_stage`, the one training loop every stage runs under (resume from
``checkpoint.pt``, logging, periodic checkpoints and evaluations, ``result.json``), and the
command-line arguments the trainers share.
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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import torch
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from aptp.data.shapes import TIERS
from aptp.data.shapes_world import ShapesWorld
from aptp.errors import SettingsError
from aptp.io import atomic_path, atomic_write_json
from aptp.models import toy

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
SETTINGS_FILE = "settings.yaml"

UserPath = Annotated[Path, AfterValidator(lambda p: p.expanduser())]
S = TypeVar("S", bound=BaseModel)


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



def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value



def load_settings(model: type[S], recipe: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                  base: dict[str, Any] | None = None, example: str = "recipes/toy-*.yaml",
                  set_example: str = "teacher.lr=1e-4") -> S:
    """Read a recipe (or start from ``base``, a stored settings dict), apply dotted ``key=value``
    overrides (values parsed as YAML) and validate once into ``model``.

    Raises:
        SettingsError: One line listing every problem.
    """
    tree: dict[str, Any] = copy.deepcopy(base) if base is not None else {}
    source = "settings"
    if recipe is not None:
        path = Path(recipe).expanduser()
        source = f"recipe {path}"
        if not path.is_file():
            raise SettingsError(f"recipe {path}: not found; pass the path of a recipe YAML file ({example})")
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
            raise SettingsError(f"--set {item!r}: expected KEY=VALUE, e.g. --set {set_example}")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    try:
        return model.model_validate(tree)
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



def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- the stage interface and its loop


class _Stage:
    """One trainable stage. Subclasses set up data and models in ``__init__``."""

    name: str

    def __init__(self, settings: Any, out: Path, output: _Output) -> None:
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



def run_stage(runner: _Stage, *, stage: str, out: Path, settings: BaseModel, cfg: _Schedule, output: _Output,
              overrides: Sequence[str], resume: bool, t_start: float, t_setup: float) -> dict[str, Any]:
    """Trains ``runner`` from its checkpoint (when resuming) to ``cfg.steps``; returns result.json's content.

    Logs every ``cfg.log_every`` steps (metrics.jsonl and a progress line), checkpoints atomically
    every ``cfg.checkpoint_every`` steps and at the end, evaluates every ``cfg.eval_every`` steps and
    at the end, then lets the runner write its product. ``train_wall_s`` adds up the optimiser steps
    of every invocation (resumes included); ``invocation_wall_s`` is this call from start to end.
    """
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

    def evaluate(step: int, label: str) -> dict[str, float]:
        t_eval = time.perf_counter()
        metrics = runner.evaluate()
        output.record("eval", step, {**metrics, "eval_s": round(time.perf_counter() - t_eval, 2)})
        output.say(f"{label}: {_fmt(metrics)}")
        return metrics

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
            output.record("train", done, {**mean, "step_s": round(step_s, 4), "train_wall_s": round(train_wall, 2)})
            output.say(f"step {done}/{cfg.steps} {_fmt(mean, ['loss', 'lr'])} {step_s:.3f} s/step "
                       f"eta {(cfg.steps - done) * step_s / 60:.1f} min")
            window, window_s = [], 0.0
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save(done)
        if done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate(done, f"eval at {done}")
    if start >= cfg.steps and not ckpt_path.is_file():
        save(cfg.steps)  # a zero-step run still leaves a resumable checkpoint
    metrics = evaluate(cfg.steps, "final eval")
    extra = runner.finish(metrics)
    result = {"stage": stage, "steps": cfg.steps, "train_wall_s": round(train_wall, 2),
              "train_wall_min": round(train_wall / 60, 2),
              "invocation_wall_s": round(time.perf_counter() - t_start, 2), "metrics": metrics, **extra}
    atomic_write_json(out / RESULT_FILE, result)
    output.say(f"done: {cfg.steps} steps, {train_wall / 60:.1f} min of training")
    return result


# ----------------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser, recipe_help: str, set_example: str) -> None:
    """The options every training subcommand takes: --recipe, --output, --steps, --resume | --overwrite,
    --set KEY=VALUE (repeatable) and --quiet."""
    parser.add_argument("--recipe", type=Path, help=f"recipe YAML ({recipe_help})")
    parser.add_argument("--output", type=Path, required=True, help="run directory")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in --output")
    mode.add_argument("--overwrite", action="store_true", help="delete a non-empty --output first")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one setting, e.g. {set_example} (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
