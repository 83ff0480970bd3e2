"""Fine-tuning the experts (paper §3.4, App. D.5): ``L = α_DDPM·L_DDPM + α_distill·L_distill``.

Each expert starts from the teacher's kept weights (``experts/expert-K``) and trains on the samples
routed to it (``routes/train/expert-K.json``, written by ``aptp route --data`` or on first use),
with output- and block-level distillation from the frozen teacher. Runs under
``accelerate launch`` (DDP over the expert), with mixed precision, gradient accumulation, an
optional EMA, atomic checkpoints and ``--resume``. Working state lives in
``finetune/expert-K/`` (settings, metrics, checkpoints); the result is written to
``finetuned/expert-K/`` in the expert format.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aptp.data import build_dataset
from aptp.engine.expert import load_expert, read_plan, save_expert
from aptp.errors import AptpUserError
from aptp.experts import route_dir, write_route_index
from aptp.io import atomic_write_json, prepare_output_dir
from aptp.rundir import FINETUNED_DIR, RunDir
from aptp.settings import Settings, write_settings
from aptp.train.checkpoint import end_of_step, latest_checkpoint, load_checkpoint, save_checkpoint, stop_on_sigint
from aptp.train.latents import TrainingSet, open_training_set
from aptp.train.diffusion import MinSnrWeights, add_noise, diffusion_target, sample_timesteps
from aptp.train.distill import capture_blocks, distill_loss, per_sample_mse
from aptp.train.batches import GlobalBatchSampler, batch_loader, generator as _gen
from aptp.train.prune import _truncate_metrics
from aptp.train.teacher import Teacher, load_teacher

logger = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    expert: int
    step: int
    interrupted: bool
    path: Path | None
    samples: int


def _weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return per_sample.mean() if weights is None else (per_sample * weights).mean()


def routed_indices(run: RunDir, k: int, is_main: bool, barrier: Callable[[], None],
                   settings: Settings | None = None) -> list[int]:
    """Training-sample indices routed to expert ``k`` in the data set that ``settings`` (default:
    the run's) build — the same settings the fine-tuning dataset is built from. The index files
    are written once per data set (:func:`aptp.experts.route_dir`)."""
    path = route_dir(run, "train", settings) / f"expert-{k}.json"
    if not path.is_file():
        if is_main:
            write_route_index(run, "train", settings=settings)
        barrier()
    from aptp.rundir import read_json

    indices = read_json(path).get("indices")
    if not isinstance(indices, list):
        from aptp.rundir import damaged

        raise damaged(path, "no list of indices", f"rebuild it with `aptp route {run.path} --data --overwrite`")
    return indices


def expert_steps(run: RunDir, settings: Settings, is_main: bool = True,
                 barrier: Callable[[], None] = lambda: None) -> dict[int, int]:
    """Fine-tuning steps of every expert of the run. ``finetune.steps_mode: per-expert`` (the paper):
    ``finetune.steps`` each. ``split``: ``finetune.steps`` in all, shared by the experts in proportion
    to the training samples routed to them (largest remainders; an expert with samples gets at least
    one step), so a mixture can be fine-tuned with the same total compute as one static model."""
    ks = [e["expert"] for e in run.experts()]
    f = settings.finetune
    if f.steps_mode == "per-expert":
        return {k: f.steps for k in ks}
    counts = {k: len(routed_indices(run, k, is_main, barrier, settings)) for k in ks}
    total = sum(counts.values())
    if total == 0:
        return {k: 0 for k in ks}
    live = [k for k in ks if counts[k] > 0]
    if f.steps < len(live):
        raise AptpUserError(f"--steps {f.steps} with finetune.steps_mode=split: fewer steps than the {len(live)} "
                            "experts that have training samples; give at least one step each")
    exact = {k: f.steps * counts[k] / total for k in ks}
    out = {k: (max(1, int(exact[k])) if counts[k] else 0) for k in ks}
    for k in sorted(live, key=lambda k: exact[k] - int(exact[k]), reverse=True):  # largest remainders
        if sum(out.values()) >= f.steps:
            break
        out[k] += 1
    while sum(out.values()) > f.steps:  # the at-least-one floor overshot: take from the largest
        k = max(live, key=lambda k: out[k])
        out[k] -= 1
    return out


class ExpertTrainer:
    """Fine-tunes one expert; ``run()`` trains, checkpoints and writes ``finetuned/expert-K``."""

    def __init__(self, run: RunDir, k: int, settings: Settings, *, teacher: Teacher | None = None,
                 accelerator=None, log: Callable[[dict], None] | None = None, indices: list[int] | None = None,
                 data: TrainingSet | None = None):
        from accelerate import Accelerator

        self.run_dir, self.k, self.s, self.f = run, k, settings, settings.finetune
        self.acc = accelerator or Accelerator(mixed_precision=self.f.mixed_precision)
        self.log = log or (lambda rec: None)
        self.work = run.path / "finetune" / f"expert-{k}"
        self.teacher = teacher or load_teacher(settings.model, device=self.acc.device)
        if indices is None:
            indices = routed_indices(run, k, self.acc.is_main_process, self.acc.wait_for_everyone, settings)
        self.indices = indices
        if not self.indices:
            raise AptpUserError(f"expert {k}: no training sample is routed to it; nothing to fine-tune")
        # the data set, its latent cache and the view the loop reads (shared by the experts of one run)
        self.data = data or open_training_set(settings, self.teacher, build_dataset(settings.data, seed=settings.seed),
                                              is_main=self.acc.is_main_process, barrier=self.acc.wait_for_everyone,
                                              batch_size=self.f.batch_size)
        self.dataset, self.latents = self.data.dataset, self.data.latents
        self.snr_weights = None if self.f.snr_gamma is None else MinSnrWeights(self.teacher.noise_scheduler,
                                                                              self.f.snr_gamma)
        self.student = load_expert(run.expert_dir(k, "initial"), device=self.acc.device)
        self.student.train().requires_grad_(True)
        self.plan = read_plan(run.expert_dir(k, "initial"))
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=self.f.lr)
        self.ema = None
        if self.f.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.student.parameters(), decay=self.f.ema_decay)
        self.model, self.optimizer = self.acc.prepare(self.student, self.optimizer)
        self.step = 0
        self.skipped = 0
        self.global_batch = self.f.batch_size * self.acc.num_processes

    # ------------------------------------------------------------------ data
    def _batches(self):
        """This process's micro-batches of the samples routed to the expert, from the current step."""
        f = self.f
        sampler = GlobalBatchSampler(self.indices, f.batch_size, self.acc.num_processes, self.acc.process_index,
                                     f.seed, start=self.step * f.grad_accum, stop=f.steps * f.grad_accum,
                                     stream=53 + self.k)
        for batch in batch_loader(self.data.items, sampler, self.s.data.num_workers):
            if self.latents is None:
                batch["pixel_values"] = batch["pixel_values"].to(self.acc.device)
            batch["skipped"] = int(batch["skipped"].sum()) if "skipped" in batch else 0
            yield batch

    def _loss(self, batch: dict[str, Any], micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        t, f = self.teacher, self.f
        b = len(batch["caption"])
        g = _gen(f.seed, 211, self.k, micro, self.acc.process_index)
        if self.latents is None:
            (mean, std), size = t.encode_images(batch["pixel_values"]), tuple(batch["pixel_values"].shape[-2:])
        else:
            (mean, std), size = self.latents.lookup(batch["index"]), self.data.items.image_size
        captions = list(batch["caption"])
        if f.caption_dropout > 0:  # its own stream: the default path draws exactly what it drew before
            drop = torch.rand(b, generator=_gen(f.seed, 223, self.k, micro, self.acc.process_index)) < f.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        text = t.encode_text(captions, size=size)
        latents = mean + std * torch.randn(mean.shape, generator=g).to(mean)
        noise = torch.randn(mean.shape, generator=g).to(mean)
        steps = sample_timesteps(t.noise_scheduler, b, generator=g).to(mean.device)  # DDPM ints or flow σ·N
        x_t = add_noise(t.noise_scheduler, latents, noise, steps)
        target = diffusion_target(t.noise_scheduler, latents, noise, steps)
        inner = self.acc.unwrap_model(self.model)
        with self.acc.autocast(), capture_blocks(inner) as sb:
            pred = t.predict(self.model, x_t, steps, text)
        w = None if self.snr_weights is None else self.snr_weights(steps).to(pred.dtype)
        l_ddpm = _weighted_mean(per_sample_mse(pred, target), w)
        if f.alpha_distill > 0:
            with torch.no_grad(), self.acc.autocast(), capture_blocks(t.denoiser) as tb:
                teacher_out = t.predict(t.denoiser, x_t, steps, text)
            l_out, l_block = distill_loss(pred, teacher_out, sb, tb)
            l_out, l_block = _weighted_mean(l_out, w), _weighted_mean(l_block, w)
        else:
            l_out = l_block = torch.zeros((), device=pred.device)
        loss = f.alpha_ddpm * l_ddpm + f.alpha_distill * (l_out + l_block)
        return loss, {"loss": float(loss.detach()), "loss_ddpm": float(l_ddpm.detach()),
                      "loss_distill_output": float(l_out.detach()), "loss_distill_block": float(l_block.detach())}

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        inner = self.acc.unwrap_model(self.model)
        return {"model": inner.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "skipped": self.skipped, "ema": self.ema.state_dict() if self.ema is not None else None}

    def checkpoint(self) -> None:
        if self.acc.is_main_process:
            save_checkpoint(self.work, self.step, self._state(), {"expert": self.k, "steps": self.f.steps},
                            keep=self.f.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        ckpt = latest_checkpoint(self.work)
        if ckpt is None:
            return False
        state, _ = load_checkpoint(ckpt)
        self.acc.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        _truncate_metrics(self.work / "metrics.jsonl", self.step)
        return True

    # ------------------------------------------------------------------ loop
    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> FinetuneResult:
        f = self.f
        t0 = time.time()
        interrupted = False
        batches = self._batches()
        with stop_on_sigint(self.acc.is_main_process) as flag:  # Ctrl-C: finish the step, checkpoint, exit
            while self.step < f.steps:
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                rec: dict[str, float] = {}
                for a in range(f.grad_accum):
                    micro = self.step * f.grad_accum + a
                    batch = next(batches)
                    sync = a == f.grad_accum - 1
                    ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.model)
                    with ctx:
                        loss, r = self._loss(batch, micro)
                        self.acc.backward(loss / f.grad_accum)
                    self.skipped += batch["skipped"]
                    for key, v in r.items():
                        rec[key] = rec.get(key, 0.0) + v / f.grad_accum
                self.optimizer.step()
                if self.ema is not None:
                    self.ema.step(self.acc.unwrap_model(self.model).parameters())
                self.step += 1
                rec = {"step": self.step, "expert": self.k, **rec, "elapsed_s": round(time.time() - t0, 3)}
                if end_of_step(self.step, f.steps, rec, main=self.acc.is_main_process,
                               metrics=self.work / "metrics.jsonl", log_every=f.log_every,
                               checkpoint_every=f.checkpoint_every, checkpoint=self.checkpoint, log=self.log,
                               progress=progress,
                               stop_requested=lambda: self.acc.reduce(
                                   torch.tensor([1.0 if flag["stop"] else 0.0], device=self.acc.device),
                                   reduction="sum").item() > 0):
                    interrupted = True
                    break
        path = None
        if not interrupted and self.acc.is_main_process:
            path = self.finish()
        self.acc.wait_for_everyone()
        return FinetuneResult(self.k, self.step, interrupted, path, len(self.indices))

    def finish(self) -> Path:
        """Write the fine-tuned expert (EMA weights when enabled) to ``finetuned/expert-K``."""
        inner = self.acc.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.copy_to(inner.parameters())
        inner.eval()
        self.plan.meta = {**self.plan.meta, "finetuned_steps": self.step, "ema": self.ema is not None,
                          "samples": len(self.indices)}
        out = save_expert(inner, self.plan, self.run_dir.path / FINETUNED_DIR / f"expert-{self.k}", overwrite=True)
        atomic_write_json(self.work / "result.json", {"expert": self.k, "step": self.step, "samples": len(self.indices),
                                                      "skipped_images": self.skipped, "path": str(out)})
        return out


def finetune(run: RunDir, settings: Settings, experts: list[int], *, overwrite: bool = False, resume: bool = False,
             progress_factory: Callable[[int], Callable] | None = None, log=None,
             skip_empty: bool = False) -> list[FinetuneResult]:
    """Fine-tune the listed experts one after another (a job array runs one per job).

    ``skip_empty``: an expert that no training sample is routed to is skipped (result with
    ``path=None`` and 0 samples; it keeps its materialized weights) instead of being an error —
    what ``--expert all`` does, since a collapsed router can leave experts without prompts.
    """
    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=settings.finetune.mixed_precision)
    results = []
    teacher = load_teacher(settings.model, device=acc.device)
    base = settings
    steps = expert_steps(run, base, acc.is_main_process, acc.wait_for_everyone)
    # one data set and latent cache for all experts (the data settings are shared)
    data = open_training_set(base, teacher, build_dataset(base.data, seed=base.seed), is_main=acc.is_main_process,
                             barrier=acc.wait_for_everyone, batch_size=base.finetune.batch_size)
    for k in experts:
        settings = base.model_copy(update={"finetune": base.finetune.model_copy(update={"steps": steps[k]})})
        indices = routed_indices(run, k, acc.is_main_process, acc.wait_for_everyone, settings)
        if skip_empty and not indices:  # the caller reports it (result with path None)
            logger.debug("expert %d: no training sample is routed to it; skipped", k)
            results.append(FinetuneResult(k, 0, False, None, 0))
            continue
        work = run.path / "finetune" / f"expert-{k}"
        final = run.path / FINETUNED_DIR / f"expert-{k}"
        if acc.is_main_process:
            if final.exists() and not (overwrite or resume):
                raise AptpUserError(f"{final} exists; pass --overwrite to fine-tune expert {k} again or --resume")
            prepare_output_dir(work, overwrite=overwrite, resume=resume and work.exists())
        acc.wait_for_everyone()
        trainer = ExpertTrainer(run, k, settings, teacher=teacher, accelerator=acc, log=log, indices=indices,
                                data=data)
        resumed = trainer.resume() if resume else False
        if acc.is_main_process and not resumed:
            write_settings(settings, work)
        if resumed and trainer.step >= settings.finetune.steps and final.exists():
            results.append(FinetuneResult(k, trainer.step, False, final, len(trainer.indices)))
            continue
        res = trainer.run(progress=progress_factory(k) if progress_factory else None)
        results.append(res)
        if res.interrupted:
            break
    return results
