"""The pruning stage (paper §3.3, Eq. 15): train the prompt router and the architecture codes.

Only the router (architecture predictor + codes) trains; the U-Net is frozen and is its own
teacher (gates off). One optimisation step:

1. prompt embeddings ``z`` (cached per prompt) → architecture logits ``e`` (Eq. 4);
2. warm-up: the predictor's own Gumbel-sigmoid vectors ``e′`` gate the U-Net; afterwards each
   sample is assigned a code by Sinkhorn optimal transport over the (global) batch (Eq. 5–7, 20)
   — or, for the ablation, by nearest cosine — and the code's Gumbel-sigmoid vector gates it;
3. loss = routed DDPM loss (code-balanced mean, Eq. 15) + λ_distill·(output + block distillation
   against the same U-Net with gates open) + λ_res·R(mean routed MACs ratio, budget) (Eq. 26) +
   λ_cont·L_cont(z, e′) (Eq. 13–14) + λ_assign·L_assign (not in the paper: cross-entropy of
   softmax(cos(e, a)/τ) against the OT assignment, so that inference routing by the nearest code
   (Eq. 22) follows the balanced training assignment; ``prune.lambda_assign: 0`` turns it off).

Distributed runs (``accelerate launch`` / ``torchrun``) split each global batch across
processes; Sinkhorn sums and the contrastive batch are global, every loss is the process's share
of the global loss, and gradients of the (tiny) router are SUM-all-reduced, so N processes with
B/N samples each train exactly what one process with B samples trains.

Ablation ``optimal_transport: false`` (Table 3, Fig. 9): each sample goes to its nearest code
while training, and the assignment-consistency loss is off as well (its target would be that same
nearest-code assignment, which reinforces collapse); the contrastive, resource and distillation
losses stay.

Method ``uni-arch-paper`` (the paper's §4.3 Uni-Arch baseline): one architecture whose two logit
vectors (width η_v, depth η_u) train directly from keep-all for ``warmup_steps + steps``, no
predictor, no warm-up, no contrastive loss.

Methods ``weight-norm``, ``taylor`` and ``bk-sdm``: one static architecture from unit importances (L1 weight
norms; first-order Taylor importance over timesteps, :mod:`aptp.train.taylor`; BK-SDM-style block
removal before weight-norm widths, :mod:`aptp.train.bk_sdm`), no training.

Method ``uni-arch`` (a stronger, warm-started Uni-Arch): one learned architecture for every prompt. It gets aptp's
warm-up (the predictor's own vectors gate the model, contrastive loss included), then a single
code starts at the medoid of the predicted architectures and trains alone (no routing, no
contrastive loss). A code started at the keep-all logit 3 moves about ``lr`` per step and was
still at 0.99 of the MACs after 400 steps; without the contrastive loss the warm-up itself
stayed at 0.97.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from aptp.data import build_dataset
from aptp.engine.gates import Gates
from aptp.engine.macs import build_macs_model
from aptp.models.profiles import macs_resolution
from aptp.engine.space import build_space
from aptp.errors import AptpUserError, SettingsError
from aptp.io import atomic_write_json, atomic_write_text, prepare_output_dir
from aptp.router.codes import logistic_noise
from aptp.router.collectives import Collective, default_collective
from aptp.router.encoder import PromptEncoder
from aptp.router.losses import assignment_loss, contrastive_loss, global_mean, resource_loss
from aptp.router.router import PromptRouter, save_router
from aptp.settings import Settings, write_settings
from aptp.train.batches import GlobalBatchSampler, batch_loader, generator as _gen
from aptp.train.latents import open_training_set
from aptp.train.checkpoint import end_of_step, latest_checkpoint, load_checkpoint, save_checkpoint, stop_on_sigint
from aptp.train.diffusion import MinSnrWeights, add_noise, diffusion_target, sample_timesteps
from aptp.train.distill import capture_blocks, distill_loss, per_sample_mse
from aptp.train.teacher import Teacher, load_teacher

STATIC_METHODS = ("weight-norm", "taylor", "bk-sdm")  # one architecture from importances, no training
logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]


def default_embedding_cache() -> Path:
    return Path.home() / ".cache" / "aptp" / "embeddings"


@dataclass
class PruneResult:
    run_dir: Path
    step: int
    interrupted: bool
    routing: dict[str, Any] | None


class Pruner:
    """Holds everything one pruning run needs; ``run()`` trains, checkpoints and writes outputs."""

    def __init__(self, settings: Settings, run_dir: Path, *, comm: Collective | None = None,
                 device: torch.device | str = "cpu", log: LogFn | None = None,
                 teacher: Teacher | None = None):
        self.s = settings
        self.p = settings.prune
        self.run_dir = Path(run_dir)
        self.comm = comm or default_collective()
        self.device = torch.device(device)
        self.log = log or (lambda rec: None)
        self.uni = self.p.method in ("uni-arch", "uni-arch-paper") + STATIC_METHODS  # one for all prompts
        self.static = self.p.method in STATIC_METHODS  # no training: a vector from importances
        self.direct = self.p.method == "uni-arch-paper"  # the code trains from the start, no warm-up
        global_batch = self.p.batch_size * self.comm.world_size
        if self.p.method == "aptp" and settings.router.num_experts > global_batch:
            raise SettingsError(
                f"--experts {settings.router.num_experts}: more experts than prompts in a batch "
                f"({self.p.batch_size} x {self.comm.world_size} processes = {global_batch}); optimal transport "
                "balances each batch over the experts, so use --batch-size >= the number of experts"
            )

        self.dataset = build_dataset(settings.data, seed=settings.seed)
        self.teacher = teacher or load_teacher(settings.model, device=self.device)
        t = self.teacher
        self.space = build_space(t.denoiser, settings.space.ffn_groups, settings.space.depth_policy)
        res = settings.data.resolution
        if res % t.vae_scale_factor:
            raise SettingsError(f"data.resolution {res}: must be a multiple of the VAE scale factor {t.vae_scale_factor}")
        self.latent_size = res // t.vae_scale_factor
        # the budget is counted at the deployment resolution, not the training one (DESIGN.md §3)
        self.macs_resolution = macs_resolution(settings, t.vae_scale_factor)
        self.macs = build_macs_model(t.denoiser, self.space, self.macs_resolution // t.vae_scale_factor,
                                     text_len=t.text_len)
        self.gates = Gates(t.denoiser, self.space)
        captions = self.dataset.captions()
        # what the loop reads: with cached latents, the captions and indices alone (no image decoded)
        self.items, self.latents = self.dataset, None
        if not self.static:  # static methods train nothing
            data = open_training_set(settings, t, self.dataset, is_main=self.comm.rank == 0,
                                     barrier=lambda: self.comm.all_reduce(torch.zeros(1)),
                                     batch_size=self.p.batch_size, captions=captions)
            self.items, self.latents = data.items, data.latents
        self.snr_weights = None if self.p.snr_gamma is None else MinSnrWeights(t.noise_scheduler, self.p.snr_gamma)

        cache = settings.router.embedding_cache or default_embedding_cache()
        self.encoder = PromptEncoder(settings.router.prompt_encoder, cache_dir=cache)
        # every prompt embedded once (and cached on disk); rank 0 first so the others read the cache
        if self.comm.rank != 0:
            self.comm.all_reduce(torch.zeros(1))
        self.z_all = self.encoder.encode(captions)
        if self.comm.rank == 0 and self.comm.world_size > 1:
            self.comm.all_reduce(torch.zeros(1))
        num_codes = 1 if self.uni else settings.router.num_experts
        self.router = PromptRouter(self.encoder.dim, self.space.size, num_codes,
                                   temperature=settings.router.gumbel_temperature,
                                   similarity=settings.router.similarity, encoder=self.encoder,
                                   generator=_gen(self.p.seed, 1))
        self.router.to(self.device)
        self.lr = self.p.effective_lr(self.comm.world_size)  # lr x sqrt(global batch) unless lr_scaling: none
        codes = [self.router.codes.logits]  # the code logits may train faster than the predictor (code_lr_scale)
        rest = [q for q in self.router.parameters() if q is not self.router.codes.logits]
        groups = [{"params": rest}, {"params": codes, "lr": self.lr * self.p.code_lr_scale}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.p.weight_decay)
        warm = max(1, self.p.lr_warmup_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.step = 0
        self.static_report: dict[str, Any] | None = None  # what a static method decided (routing.json)
        self.codes_ready = self.static or self.direct  # aptp and uni-arch start with the warm-up
        self.skipped = 0
        self.budget = self.p.budget
        self.global_batch = self.p.batch_size * self.comm.world_size
        self.total_steps = 0 if self.static else self.p.warmup_steps + self.p.steps
        if self.static:
            from aptp.engine.baselines import importance_vector, unit_l1_norms

            if self.p.method == "taylor":
                from aptp.train.taylor import taylor_scores

                scores = taylor_scores(t, self.space, self.dataset, batches=self.p.importance_batches,
                                       batch_size=self.p.batch_size, seed=self.p.seed, gates=self.gates)
            else:
                scores = unit_l1_norms(t.denoiser, self.space)
            if self.p.method == "bk-sdm":
                v = self._bk_sdm_vector(scores)
            else:
                v = importance_vector(self.space, self.macs, scores, self.budget)
            bias = self.router.init_bias
            with torch.no_grad():  # the single code's hard vector is exactly v
                self.router.codes.logits.copy_(torch.where(v > 0, bias, -bias).unsqueeze(0))

    def _bk_sdm_vector(self, norms: torch.Tensor) -> torch.Tensor:
        """Block pairs removed least sensitive first while the budget allows, then weight-norm widths."""
        from aptp.engine.baselines import block_removal_vector
        from aptp.train.bk_sdm import block_pairs, removal_sensitivity

        names, groups = block_pairs(self.space)
        if not groups:
            raise SettingsError("--method bk-sdm: this model's space has no removable blocks "
                                "(space.depth_policy is 'none'?)")
        sens = removal_sensitivity(self.teacher, self.space, self.dataset, groups, batches=self.p.importance_batches,
                                   batch_size=self.p.batch_size, seed=self.p.seed, gates=self.gates)
        order = sorted(range(len(groups)), key=lambda k: float(sens[k]))
        v, removed = block_removal_vector(self.space, self.macs, norms, [groups[k] for k in order], self.budget)
        dropped = {names[order[k]] for k in removed}
        self.static_report = {"blocks": [{"block": names[k], "sensitivity": float(sens[k]),
                                          "removed": names[k] in dropped} for k in range(len(groups))]}
        logger.info("bk-sdm: removed %s (of %d block pairs), then widths by weight norm",
                    sorted(dropped) or "no block", len(groups))
        return v

    # ------------------------------------------------------------------ data
    def _batches(self):
        """This process's micro-batches from the current step to the end (resumable order)."""
        ga = self.p.grad_accum
        sampler = GlobalBatchSampler(range(len(self.dataset)), self.p.batch_size, self.comm.world_size,
                                     self.comm.rank, self.p.seed, start=self.step * ga, stop=self.total_steps * ga)
        for batch in batch_loader(self.items, sampler, self.s.data.num_workers):
            if self.latents is None:
                batch["pixel_values"] = batch["pixel_values"].to(self.device)
            batch["z"] = self.z_all[batch["index"]].to(self.device)  # the caption actually returned
            batch["skipped"] = int(batch["skipped"].sum()) if "skipped" in batch else 0
            yield batch

    # ------------------------------------------------------------------ one micro-batch
    def _loss(self, batch: dict[str, Any], micro_step: int) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
        t, s, p = self.teacher, self.s, self.p
        rank, b = self.comm.rank, self.p.batch_size
        # All randomness is drawn for the whole global batch from a generator fixed by the step,
        # then sliced: a sample's noise never depends on how the batch is split over processes.
        g = _gen(p.seed, 101, micro_step)
        bg = self.global_batch
        mine = slice(rank * b, (rank + 1) * b)
        with torch.no_grad():
            if self.latents is None:
                mean, std = t.encode_images(batch["pixel_values"])
                size = tuple(batch["pixel_values"].shape[-2:])
            else:
                (mean, std), size = self.latents.lookup(batch["index"]), self.items.image_size
            text = t.encode_text(batch["caption"], size=size)
        shape = mean.shape[1:]
        eps_vae = torch.randn((bg, *shape), generator=g)[mine].to(mean)
        noise = torch.randn((bg, *shape), generator=g)[mine].to(mean)
        timesteps = sample_timesteps(t.noise_scheduler, bg, generator=g)[mine]  # DDPM ints or flow σ·N
        gumbel = logistic_noise((bg, self.space.size), generator=g)[mine].to(self.device)
        latents = mean + std * eps_vae
        timesteps = timesteps.to(self.device)
        x_t = add_noise(t.noise_scheduler, latents, noise, timesteps)
        target = diffusion_target(t.noise_scheduler, latents, noise, timesteps)

        z = batch["z"]
        warmup = not self.codes_ready
        e, code_gates = self.router(z, generator=g)  # code noise: one draw shared by all processes
        e_soft = torch.sigmoid((e + gumbel) / self.router.temperature)  # e′, Eq. 12
        if warmup:
            vectors, assign = e_soft, None
        elif self.uni:
            vectors = code_gates[0].expand(z.shape[0], -1)
            assign = torch.zeros(z.shape[0], dtype=torch.long)
        else:
            assign = self.router.assign_train(e, optimal_transport=p.optimal_transport,
                                              epsilon=s.router.sinkhorn_epsilon,
                                              iterations=s.router.sinkhorn_iterations,
                                              all_reduce=self.comm.all_reduce)
            vectors = code_gates[assign]
        l_assign = None
        if assign is not None and not self.uni and p.lambda_assign > 0 and p.optimal_transport:
            cos = self.router.cosines(e)  # (B, N), differentiable in e and the codes
            l_assign = global_mean(assignment_loss(cos, assign, s.router.assignment_temperature),
                                   self.comm.all_reduce)

        with self._autocast(), self.gates.apply(vectors), capture_blocks(t.denoiser) as student_blocks:
            student = t.predict(t.denoiser, x_t, timesteps, text)
        l_ddpm = per_sample_mse(student, target)  # (B,)
        if p.distill:
            with torch.no_grad(), self._autocast(), self.gates.off(), capture_blocks(t.denoiser) as teacher_blocks:
                teacher_out = t.predict(t.denoiser, x_t, timesteps, text)
            l_out, l_block = distill_loss(student, teacher_out, student_blocks, teacher_blocks)
        else:
            l_out = l_block = torch.zeros_like(l_ddpm)
        per_sample = l_ddpm + p.lambda_distill * (l_out + l_block)
        if self.snr_weights is not None:  # min-SNR-γ timestep weights, mean 1 over the timestep law
            per_sample = per_sample * self.snr_weights(timesteps).to(per_sample)

        # Eq. 15: the mean over codes of the mean over each code's samples, with global counts;
        # in warm-up a plain global mean. ``local_task`` is this process's share of that value.
        if assign is None:
            n_global = self.comm.all_reduce(torch.tensor([float(len(per_sample))], dtype=torch.float64))[0]
            weights = torch.full_like(per_sample, 1.0 / float(n_global))
        else:
            counts = self.comm.all_reduce(torch.bincount(assign.cpu(), minlength=self.router.num_codes).double())
            active = (counts > 0).sum()
            weights = (1.0 / (active * counts[assign.cpu()])).to(per_sample)
        local_task = (per_sample * weights).sum()

        if p.resource_on == "hard":
            # the MACs of the noise-free binary architectures that materialize will slice
            # (straight-through: the gradient of sigmoid(logit/γ)); see PruneSettings.resource_on
            if not warmup:
                hard = self.router.code_vectors(hard=True, training=False)
                measured = hard[0].expand(z.shape[0], -1) if self.uni else hard[assign]
            else:
                measured = self.router.soft_vectors(e, hard=True, training=False)
        else:
            measured = vectors
        ratios = self.macs.ratio(measured)  # (B,), differentiable in the gates
        mean_ratio = global_mean(ratios, self.comm.all_reduce)
        if p.resource_per == "expert":  # Eq. 26 per sample, then the global mean: each expert at the budget
            l_res = global_mean(resource_loss(ratios, self.budget), self.comm.all_reduce)
        else:
            l_res = resource_loss(mean_ratio, self.budget)
        if self.uni and not warmup:  # the warm-up is aptp's own, contrastive loss included
            l_cont = torch.zeros((), dtype=l_res.dtype)
        else:
            l_cont = contrastive_loss(z, e_soft, s.router.contrastive_temperature,
                                      all_gather=self.comm.all_gather, rank=rank).to(l_res.dtype)
        # l_res and l_cont hold the global value but only this process's part of the gradient;
        # the router's gradients are SUM-reduced across processes (``_sync_grads``).
        if l_assign is None:
            l_assign = torch.zeros((), dtype=l_res.dtype)
        l_assign = l_assign.to(l_res.dtype)
        loss = local_task + p.lambda_res * l_res + p.lambda_cont * l_cont + p.lambda_assign * l_assign

        stats = torch.stack([l_ddpm.sum(), l_out.sum(), l_block.sum(), torch.tensor(float(len(l_ddpm)))]).detach()
        tot = self.comm.all_reduce(stats.double())
        n = tot[3]
        record = {
            "loss": float(self.comm.all_reduce(local_task.detach().double().reshape(1))[0]
                          + p.lambda_res * l_res.detach() + p.lambda_cont * l_cont.detach()
                          + p.lambda_assign * l_assign.detach()),
            "loss_ddpm": float(tot[0] / n), "loss_distill_output": float(tot[1] / n),
            "loss_distill_block": float(tot[2] / n), "loss_resource": float(l_res.detach()),
            "loss_contrastive": float(l_cont.detach()), "loss_assign": float(l_assign.detach()),
            "macs_ratio": float(mean_ratio.detach()),
            "phase": "warmup" if warmup else ("uni-arch" if self.uni else "codes"),
        }
        global_assign = None
        if assign is not None and not self.uni:
            global_assign = self.comm.all_reduce(
                torch.bincount(assign.cpu(), minlength=self.router.num_codes).double())
        return loss, record, global_assign

    def _autocast(self):
        mp = self.p.mixed_precision
        if mp == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if mp == "fp16" else torch.bfloat16)

    def _sync_grads(self) -> None:
        """SUM-all-reduce the router's gradients (missing ones count as zeros)."""
        if self.comm.world_size == 1:
            return
        for prm in self.router.parameters():
            grad = prm.grad if prm.grad is not None else torch.zeros_like(prm)
            prm.grad = self.comm.all_reduce(grad)

    def _init_codes(self) -> None:
        """End of warm-up: codes start as k-means++ picks among the predictor's embeddings of a
        fixed sample of prompts (the same on every process); uni-arch's single code starts at
        their medoid, a real predicted architecture (so at the budget) closest to their mean —
        the mean itself keeps every unit most prompts keep and started at 0.97 of the MACs."""
        n = len(self.z_all)
        pick = torch.randperm(n, generator=_gen(self.p.seed, 29))[: min(n, 4096)]
        with torch.no_grad():
            e = self.router.embed(self.z_all[pick].to(self.device))
            if self.uni:  # the medoid: the predicted architecture most cosine-similar to the mean
                unit = torch.nn.functional.normalize(e.double(), dim=1)
                centre = torch.nn.functional.normalize(e.double().mean(dim=0), dim=0)
                self.router.codes.logits.copy_(e[int((unit @ centre).argmax())].unsqueeze(0))
        if not self.uni:
            self.router.init_codes(e, generator=_gen(self.p.seed, 31))
        self.codes_ready = True

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {"router": self.router.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_schedule": self.lr_schedule.state_dict(), "step": self.step,
                "codes_ready": self.codes_ready, "skipped": self.skipped, "budget": self.budget}

    def load_state(self, state: dict[str, Any]) -> None:
        self.router.load_state_dict(state["router"])
        optimizer, schedule = self._two_groups(state["optimizer"], state["lr_schedule"])
        self.optimizer.load_state_dict(optimizer)
        self.lr_schedule.load_state_dict(schedule)
        self.step = int(state["step"])
        self.codes_ready = bool(state["codes_ready"])
        self.skipped = int(state["skipped"])
        self.budget = float(state["budget"])

    def _two_groups(self, optimizer: dict[str, Any], schedule: dict[str, Any]) -> tuple[dict, dict]:
        """Checkpoints written before ``prune.code_lr_scale`` existed hold one AdamW parameter group for
        the whole router; today the code logits have their own. Split the saved group the same way
        (Adam's moments are kept per parameter, so none is lost) and give the codes' group the lr x
        code_lr_scale of the settings. A checkpoint that already has two groups is returned as is."""
        groups = optimizer["param_groups"]
        if len(groups) != 1 or len(self.optimizer.param_groups) != 2:
            return optimizer, schedule
        params = list(self.router.parameters())
        (old,) = groups
        if len(old["params"]) != len(params):
            return optimizer, schedule  # not this router's: load_state_dict says what is wrong
        # the saved ids follow router.parameters(), the order the single group was built in
        code_id = old["params"][next(i for i, q in enumerate(params) if q is self.router.codes.logits)]
        scale = self.p.code_lr_scale
        rest = {**old, "params": [i for i in old["params"] if i != code_id]}
        codes = {**old, "params": [code_id], "lr": old["lr"] * scale}
        if "initial_lr" in old:
            codes["initial_lr"] = old["initial_lr"] * scale
        schedule = dict(schedule)
        for key in ("base_lrs", "_last_lr"):
            if isinstance(schedule.get(key), list) and len(schedule[key]) == 1:
                schedule[key] = [schedule[key][0], schedule[key][0] * scale]
        return {**optimizer, "param_groups": [rest, codes]}, schedule

    def checkpoint(self) -> None:
        if self.comm.rank == 0:
            save_checkpoint(self.run_dir, self.step, self.state(),
                            {"budget": self.budget, "method": self.p.method, "codes_ready": self.codes_ready,
                             "total_steps": self.total_steps}, keep=self.p.keep_checkpoints)
        self.comm.all_reduce(torch.zeros(1))  # barrier

    def resume(self) -> bool:
        """Continue from the newest checkpoint; the budget target comes from the checkpoint."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return False
        state, info = load_checkpoint(ckpt)
        if abs(float(state["budget"]) - self.p.budget) > 1e-12:
            raise SettingsError(
                f"--resume: the run was pruning to budget {state['budget']}, the settings say {self.p.budget}; "
                f"resume with the original budget or start a new run")
        self.load_state(state)
        _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        return True

    # ------------------------------------------------------------------ loop
    def run(self, progress: Callable[[int, int, dict], None] | None = None) -> PruneResult:
        p = self.p
        interrupted = False
        metrics = self.run_dir / "metrics.jsonl"
        t0 = time.time()
        batches = self._batches()
        with stop_on_sigint(self.comm.rank == 0) as flag:  # Ctrl-C: finish the step, checkpoint, exit
            while self.step < self.total_steps:
                if not self.codes_ready and self.step >= p.warmup_steps:
                    self._init_codes()
                self.router.train()
                self.optimizer.zero_grad(set_to_none=True)
                acc_record: dict[str, float] = {}
                shares = torch.zeros(self.router.num_codes, dtype=torch.float64)
                for k in range(p.grad_accum):
                    micro = self.step * p.grad_accum + k
                    batch = next(batches)
                    loss, rec, assign_counts = self._loss(batch, micro)
                    (loss / p.grad_accum).backward()
                    self.skipped += batch["skipped"]
                    for key, val in rec.items():
                        if isinstance(val, float):
                            acc_record[key] = acc_record.get(key, 0.0) + val / p.grad_accum
                        else:
                            acc_record[key] = val
                    if assign_counts is not None:
                        shares += assign_counts
                self._sync_grads()
                self.optimizer.step()
                self.lr_schedule.step()
                self.step += 1
                rec = {"step": self.step, **acc_record, "lr": self.lr_schedule.get_last_lr()[0],
                       "elapsed_s": round(time.time() - t0, 3)}
                if shares.sum() > 0:
                    rec["share_per_expert"] = (shares / shares.sum()).tolist()
                    rec["busiest_share"] = float((shares / shares.sum()).max())
                if end_of_step(self.step, self.total_steps, rec, main=self.comm.rank == 0, metrics=metrics,
                               log_every=p.log_every, checkpoint_every=p.checkpoint_every,
                               checkpoint=self.checkpoint, log=self.log, progress=progress,
                               stop_requested=lambda: self.comm.all_reduce(
                                   torch.tensor([1.0 if flag["stop"] else 0.0])).item() > 0):
                    interrupted = True
                    break
        routing = None
        if not interrupted:
            routing = self.finish()
        return PruneResult(self.run_dir, self.step, interrupted, routing)

    # ------------------------------------------------------------------ outputs
    def finish(self) -> dict[str, Any] | None:
        """Write the router, the codes, and the routing of the validation prompts."""
        if self.comm.rank != 0:
            return None
        if not self.codes_ready:  # a run shorter than its warm-up still leaves usable codes
            self._init_codes()
        self.router.eval()
        save_router(self.router, self.run_dir)
        routing = routing_report(self.router, self.macs, self._validation_captions(), self.budget)
        routing["macs_resolution"] = self.macs_resolution
        routing["budget_tolerance"] = self.p.budget_tolerance
        routing["budget_met"] = abs(routing["mean_macs_ratio"] - self.budget) <= self.p.budget_tolerance
        if self.static_report is not None:
            routing["static"] = self.static_report
        routing["skipped_images"] = self.skipped
        atomic_write_json(self.run_dir / "routing.json", routing)
        return routing

    def _validation_captions(self) -> list[str]:
        try:
            return build_dataset(self.s.data, split="validation", seed=self.s.seed).captions()
        except AptpUserError:
            return self.dataset.captions()[:2000]


def routing_report(router: PromptRouter, macs, captions: list[str], budget: float) -> dict[str, Any]:
    """Inference routing (cosine, hard codes, no noise) of ``captions``: shares and mean MACs."""
    hard = router.hard_codes()
    if router.num_codes == 1:
        index = torch.zeros(len(captions), dtype=torch.long)
    else:
        index, _ = router.route_prompts(captions)
    ratios = macs.ratio(hard.double()).float()  # (N,)
    counts = torch.bincount(index, minlength=router.num_codes).double()
    share = counts / counts.sum()
    distinct = len({tuple(h.tolist()) for h in hard.int()})
    return {
        "prompts": len(captions),
        "budget": budget,
        "mean_macs_ratio": float((share * ratios.double()).sum()),
        "macs_ratio_per_expert": ratios.tolist(),
        "share_per_expert": share.tolist(),
        "min_share": float(share.min()),
        "busiest_share": float(share.max()),
        "distinct_codes": distinct,
        "num_codes": router.num_codes,
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    from aptp.rundir import damaged

    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            if i == len(lines) - 1:  # a line cut short by a kill mid-write: it is redone anyway
                break
            raise damaged(path, exc, "move it aside and resume (the metrics log is rewritten from the "
                                     "checkpoint on)") from None
        if isinstance(record, dict) and record.get("step", 0) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _distributed_state():
    """Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) let accelerate set up the process
    group (gloo on CPU, NCCL on GPUs) and pick this process's device."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def prune(settings: Settings, *, overwrite: bool = False, resume: bool = False, log: LogFn | None = None,
          progress: Callable[[int, int, dict], None] | None = None, device: str | None = None) -> PruneResult:
    """Run ``aptp prune``: prepare the run directory, train, write outputs. Resumable."""
    if settings.output is None:
        raise SettingsError("prune needs an output directory: pass --output DIR")
    state = _distributed_state()
    comm = default_collective()
    run_dir = Path(settings.output)
    if comm.rank == 0:
        prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
    comm.all_reduce(torch.zeros(1))
    if device is None:
        device = state.device if state is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    pruner = Pruner(settings, run_dir, comm=comm, device=device, log=log)
    resumed = pruner.resume() if resume else False
    if comm.rank == 0:
        if not resumed:
            write_settings(settings, run_dir)
        pruner.space.save(run_dir / "arch_space.json")
    return pruner.run(progress=progress)
