"""The denoising objective of the teacher's own scheduler: DDPM-family or flow matching.

Two families, told apart by the *scheduler* (never by the model):

* **DDPM family** (DDPM, DDIM, DPM-Solver, Euler, PNDM, …: every scheduler with betas): integer
  timesteps uniform in ``[0, num_train_timesteps)``, ``x_t = scheduler.add_noise(x0, noise, t)``,
  and the target of the ``prediction_type`` (epsilon / v_prediction / sample). Training uses a
  ``DDPMScheduler`` built from the pipeline scheduler's config (same betas, same prediction type).
* **Flow matching** (rectified flow: ``FlowMatchEulerDiscreteScheduler`` of SD3 and Flux, and any
  scheduler configured with ``use_flow_sigmas`` or ``prediction_type="flow_prediction"``): a noise
  level σ in (0, 1), ``x_t = (1 − σ)·x0 + σ·noise``, ``timesteps = σ·num_train_timesteps`` as floats
  (what ``StableDiffusion3Pipeline`` passes to its transformer; ``FluxPipeline`` passes
  ``timesteps / 1000`` and ``FluxTransformer2DModel`` multiplies back — a backbone adapter's
  concern, not this module's), and the velocity target ``noise − x0``.
"""

from __future__ import annotations

import torch

SIGMA_SAMPLING = ("logit_normal", "uniform")


def is_flow_matching(scheduler) -> bool:
    """Whether ``scheduler`` is a flow-matching (rectified flow) scheduler.

    True for the diffusers ``FlowMatch*`` schedulers (SD3, Flux) and for schedulers configured with
    flow sigmas (``use_flow_sigmas`` or ``prediction_type="flow_prediction"``); False for the DDPM
    family.
    """
    if any(c.__name__.startswith("FlowMatch") for c in type(scheduler).__mro__):
        return True
    config = getattr(scheduler, "config", None)
    if config is None:
        return False
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    return bool(get("use_flow_sigmas", False)) or get("prediction_type", None) == "flow_prediction"


def training_scheduler(pipeline_scheduler):
    """The scheduler that defines the training objective for a pipeline's (sampling) scheduler.

    DDPM family: ``DDPMScheduler.from_config(pipeline_scheduler.config)`` (same betas and
    prediction type whatever sampler the pipeline ships). Flow matching: the scheduler itself
    (only its ``num_train_timesteps`` is read; its sampling state is never used).
    """
    if is_flow_matching(pipeline_scheduler):
        return pipeline_scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline_scheduler.config)


def sample_sigmas(batch: int, generator: torch.Generator | None = None, *, sampling: str = "logit_normal",
                  logit_mean: float = 0.0, logit_std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Flow-matching noise levels σ, shape ``(batch,)``, float32, on the CPU (the generator's device).

    Args:
        sampling: ``"logit_normal"`` (default; σ = sigmoid(N(logit_mean, logit_std²)), in (0, 1),
            what SD3 trains with and its paper found best) or ``"uniform"`` (σ ~ U[0, 1), as
            ``torch.rand``).
        shift: the time shift ``σ ← shift·σ / (1 + (shift − 1)·σ)`` applied after sampling (1: none;
            SD3 and FLUX.1-dev schedulers ship ``shift=3``, which biases training toward noise).
    """
    if sampling == "logit_normal":
        sigmas = torch.sigmoid(torch.randn((batch,), generator=generator) * logit_std + logit_mean)
    elif sampling == "uniform":
        sigmas = torch.rand((batch,), generator=generator)
    else:
        raise ValueError(f"unknown sigma sampling {sampling!r}; expected one of {SIGMA_SAMPLING}")
    if shift != 1.0:
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


def sample_timesteps(scheduler, batch: int, generator: torch.Generator | None = None, **sigma_kwargs) -> torch.Tensor:
    """Training timesteps for ``batch`` samples, on the CPU.

    DDPM family: int64, uniform in ``[0, num_train_timesteps)`` (one ``torch.randint`` draw;
    ``sigma_kwargs`` must be empty). Flow matching: float32 ``σ·num_train_timesteps`` with σ from
    :func:`sample_sigmas` (``sigma_kwargs`` are its keyword arguments).
    """
    n = scheduler.config.num_train_timesteps
    if is_flow_matching(scheduler):
        return sample_sigmas(batch, generator, **sigma_kwargs) * n
    if sigma_kwargs:
        raise TypeError(f"σ sampling options {sorted(sigma_kwargs)} apply to flow-matching schedulers only")
    return torch.randint(0, n, (batch,), generator=generator)


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """``x_t``: ``scheduler.add_noise`` (DDPM family) or ``(1 − σ)·x0 + σ·noise`` with σ = t / N (flow)."""
    if not is_flow_matching(scheduler):
        return scheduler.add_noise(latents, noise, timesteps)
    sigma = (timesteps.to(device=latents.device, dtype=torch.float32) / scheduler.config.num_train_timesteps)
    sigma = sigma.to(latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))
    return (1 - sigma) * latents + sigma * noise


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to predict: ``noise − x0`` (flow matching) or the target of the
    scheduler's ``prediction_type`` (DDPM family)."""
    if is_flow_matching(scheduler):
        return noise - latents
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def noisy_batch(scheduler, latents: torch.Tensor, generator: torch.Generator | None = None, **sigma_kwargs):
    """Sample noise and timesteps, return (noisy latents, timesteps, target).

    Draws, in this order from ``generator``: the noise (``latents.shape``), then the timesteps
    (:func:`sample_timesteps`; ``sigma_kwargs`` go to :func:`sample_sigmas` for flow matching).
    The DDPM-family path is unchanged from before flow matching existed.
    """
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    t = sample_timesteps(scheduler, b, generator, **sigma_kwargs).to(latents.device)
    return add_noise(scheduler, latents, noise, t), t, diffusion_target(scheduler, latents, noise, t)


class MinSnrWeights:
    """Min-SNR-γ loss weights (Hang et al. 2023) for the prediction target of ``scheduler``: called
    on timesteps ``(B,)``, returns float32 weights ``(B,)`` normalised so that their mean over the
    training timestep distribution is 1 (the loss keeps its scale against the other terms; only its
    spread over noise levels changes). The normaliser is computed once, here, not every step.

    In terms of the clean-latent error the weight is ``min(SNR, γ)``; on the scheduler's own target it
    becomes ``min(SNR, γ)/SNR`` (epsilon), ``min(SNR, γ)/(SNR + 1)`` (v-prediction), ``min(SNR, γ)``
    (sample) and ``min((1 − σ)², γ·σ²)`` (flow matching, velocity target, SNR = ((1 − σ)/σ)²).
    It lowers the weight of the nearly clean timesteps, whose small errors otherwise dominate the
    mean, and, for the velocity targets, that of the pure-noise ones.
    """

    def __init__(self, scheduler, gamma: float) -> None:
        if not gamma > 0:
            raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
        self.scheduler, self.gamma = scheduler, float(gamma)
        self.flow = is_flow_matching(scheduler)
        n = scheduler.config.num_train_timesteps
        if self.flow:
            grid = sample_timesteps(scheduler, 8192, torch.Generator().manual_seed(0))  # the training σ law
        else:
            grid = torch.arange(n)  # uniform integer timesteps: the exact mean
        self.scale = self._raw(grid).mean()

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        sched, gamma = self.scheduler, self.gamma
        if self.flow:
            sigma = (t.double() / sched.config.num_train_timesteps).clamp(1e-6, 1 - 1e-6)
            return torch.minimum((1 - sigma) ** 2, gamma * sigma ** 2)
        abar = sched.alphas_cumprod.double()[t.long().cpu()]
        snr = abar / (1 - abar)
        clipped = snr.clamp(max=gamma)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1)
        if kind == "sample":
            return clipped
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        return (self._raw(timesteps.detach().cpu()) / self.scale).float().to(timesteps.device)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """:class:`MinSnrWeights` of ``scheduler`` and ``gamma`` applied once to ``timesteps``."""
    return MinSnrWeights(scheduler, gamma)(timesteps)
