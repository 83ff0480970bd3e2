"""First-order Taylor importance of every width unit over diffusion timesteps (``--method taylor``).

The static baseline of Diff-Pruning (Fang et al., 2023, "Structural Pruning for Diffusion
Models"): a unit's importance is the first-order estimate of how much the denoising loss changes
when it is removed, accumulated over timesteps spread across the whole schedule. In the engine's
space that estimate is the gradient of the loss with respect to the unit's gate at 1 — the gate
multiplies exactly the unit's channels where zeroing them equals removing it (masked ≡ sliced),
so ∂L/∂m = Σ_channels a·∂L/∂a, the activation-times-gradient form of the Taylor criterion
(Molchanov et al., 2019) summed over the unit. Gradients are summed over ``batches`` batches (each
with timesteps stratified over the schedule) before taking the magnitude, as Diff-Pruning
accumulates its gradients over timesteps. The vector is then made like weight-norm's
(:func:`aptp.engine.baselines.importance_vector`): weakest units relative to their layer first,
every layer keeps one unit, depth units kept, until the MACs reach the budget.
"""

from __future__ import annotations

import torch

from aptp.engine.gates import Gates
from aptp.engine.space import ArchSpace
from aptp.train.batches import GlobalBatchSampler, batch_loader, generator as _gen
from aptp.train.diffusion import add_noise, diffusion_target, is_flow_matching
from aptp.train.distill import per_sample_mse
from aptp.train.teacher import Teacher


def stratified_timesteps(scheduler, batch: int, generator: torch.Generator) -> torch.Tensor:
    """One timestep per sample, stratified over the training schedule (every part covered)."""
    n = scheduler.config.num_train_timesteps
    u = (torch.arange(batch, dtype=torch.float64) + torch.rand(batch, generator=generator, dtype=torch.float64)) / batch
    t = u * n
    return t.float() if is_flow_matching(scheduler) else t.long().clamp(0, n - 1)


def stratified_batches(teacher: Teacher, dataset, *, batches: int, batch_size: int, seed: int, stream: int):
    """``batches`` batches of the data set as ``(x_t, t, text, target)``: the latents of fresh VAE
    samples noised at timesteps stratified over the schedule, all drawn from ``(seed, stream, i)``
    (the measurements of the static baselines see the same inputs run after run)."""
    sampler = GlobalBatchSampler(range(len(dataset)), batch_size, 1, 0, seed, start=0, stop=batches)
    sched = teacher.noise_scheduler
    for i, batch in enumerate(batch_loader(dataset, sampler)):
        g = _gen(seed, stream, i)
        device = teacher.denoiser.device
        with torch.no_grad():
            mean, std = teacher.encode_images(batch["pixel_values"].to(device))
            text = teacher.encode_text(batch["caption"], size=tuple(batch["pixel_values"].shape[-2:]))
        latents = mean + std * torch.randn(mean.shape, generator=g).to(mean)
        noise = torch.randn(mean.shape, generator=g).to(mean)
        t = stratified_timesteps(sched, latents.shape[0], g).to(device)
        yield add_noise(sched, latents, noise, t), t, text, diffusion_target(sched, latents, noise, t)


def taylor_scores(teacher: Teacher, space: ArchSpace, dataset, *, batches: int = 8, batch_size: int = 16,
                  seed: int = 0, gates: Gates | None = None) -> torch.Tensor:
    """(D,) |Σ ∂L/∂gate| of every unit over ``batches`` batches (NaN at depth units).

    Args:
        teacher: the frozen teacher (its denoiser is gated; its weights get no gradient).
        space: the denoiser's architecture space.
        dataset: the pruning data set (image + caption samples).
        batches, batch_size: how much data the estimate sees.
        seed: data order, noise and timesteps.
        gates: gates already attached to the teacher's denoiser (else attached here and removed).
    """
    own = gates is None
    gates = gates or Gates(teacher.denoiser, space)
    total = torch.zeros(space.size, dtype=torch.float64)
    try:
        for x_t, t, text, target in stratified_batches(teacher, dataset, batches=batches, batch_size=batch_size,
                                                        seed=seed, stream=401):
            v = torch.ones(space.size, device=x_t.device, requires_grad=True)
            with gates.apply(v.expand(x_t.shape[0], -1)):
                pred = teacher.predict(teacher.denoiser, x_t, t, text)
            per_sample_mse(pred, target).mean().backward()
            total += v.grad.detach().double().cpu()
    finally:
        if own:
            gates.remove()
    scores = total.abs()
    scores[space.depth_mask()] = float("nan")
    return scores
