"""aptp.train.diffusion: flow matching (SD3 / Flux) beside the unchanged DDPM-family objective."""

from __future__ import annotations

import pytest
import torch

from aptp.train.diffusion import (add_noise, diffusion_target, is_flow_matching, noisy_batch, sample_sigmas,
                                  sample_timesteps, training_scheduler)


def _flow(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**{"num_train_timesteps": 1000, "shift": 3.0, **kw})


def _ddpm(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type)


def _latents(b=4, seed=0):
    return torch.randn(b, 16, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_is_flow_matching_branches_on_the_scheduler():
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchHeunDiscreteScheduler)

    assert is_flow_matching(_flow()) and is_flow_matching(FlowMatchHeunDiscreteScheduler())
    assert is_flow_matching(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"))
    for s in (_ddpm(), _ddpm("v_prediction"), DDIMScheduler(), DPMSolverMultistepScheduler(), EulerDiscreteScheduler()):
        assert not is_flow_matching(s), type(s).__name__


def test_training_scheduler():
    from diffusers import DDIMScheduler, DDPMScheduler

    flow = _flow()
    assert training_scheduler(flow) is flow
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="v_prediction")
    t = training_scheduler(ddim)
    assert type(t) is DDPMScheduler and t.config.prediction_type == "v_prediction"
    assert torch.equal(t.alphas_cumprod, DDPMScheduler.from_config(ddim.config).alphas_cumprod)


def test_sigma_zero_is_the_clean_latent_and_one_is_noise():
    s, x0, noise = _flow(), _latents(), _latents(seed=1)
    zero, full = torch.zeros(4), torch.full((4,), 1000.0)
    assert torch.equal(add_noise(s, x0, noise, zero), x0)
    assert torch.equal(add_noise(s, x0, noise, full), noise)
    assert torch.equal(diffusion_target(s, x0, noise, zero), noise - x0)
    assert torch.equal(diffusion_target(s, x0, noise, full), noise - x0)  # velocity: the same at every t
    mixed = add_noise(s, x0, noise, torch.tensor([0.0, 250.0, 500.0, 1000.0]))
    for i, sigma in enumerate((0.0, 0.25, 0.5, 1.0)):
        torch.testing.assert_close(mixed[i], (1 - sigma) * x0[i] + sigma * noise[i])


def test_add_noise_matches_the_scheduler_and_the_euler_sampler_inverts_it():
    """x_t agrees with FlowMatchEulerDiscreteScheduler.scale_noise at its own timesteps, and Euler
    steps with the oracle velocity (the target) walk x_t back to x0: same sign, same time axis."""
    s = _flow()
    s.set_timesteps(4)
    x0, noise = _latents(1), _latents(1, seed=1)
    for t in s.timesteps:
        torch.testing.assert_close(add_noise(s, x0, noise, t.reshape(1)), s.scale_noise(x0, t.reshape(1), noise))
    x = add_noise(s, x0, noise, s.timesteps[:1])
    for t in s.timesteps:
        v = diffusion_target(s, x0, noise, t.reshape(1))
        x = s.step(v, t, x).prev_sample
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampling", ["logit_normal", "uniform"])
def test_flow_timesteps_range_and_dtype(sampling):
    s = _flow()
    t = sample_timesteps(s, 4096, torch.Generator().manual_seed(0), sampling=sampling)
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert float(t.min()) >= 0 and float(t.max()) < 1000
    sig = t / 1000
    assert abs(float(sig.mean()) - 0.5) < 0.02
    if sampling == "logit_normal":  # concentrated in the middle: fewer tails than uniform
        assert float(((sig < 0.1) | (sig > 0.9)).float().mean()) < 0.1
        assert float(t.min()) > 0


def test_sigma_shift_and_options():
    g = torch.Generator().manual_seed(0)
    base = sample_sigmas(256, torch.Generator().manual_seed(0), sampling="uniform")
    shifted = sample_sigmas(256, torch.Generator().manual_seed(0), sampling="uniform", shift=3.0)
    torch.testing.assert_close(shifted, 3 * base / (1 + 2 * base))
    assert bool((shifted >= base).all())
    assert abs(3 * 0.5 / (1 + 2 * 0.5) - 0.75) < 1e-12
    moved = sample_sigmas(4096, g, logit_mean=2.0)
    assert float(moved.mean()) > 0.75
    with pytest.raises(ValueError, match="sigma sampling"):
        sample_sigmas(2, sampling="cosine")
    with pytest.raises(TypeError, match="flow-matching"):
        sample_timesteps(_ddpm(), 2, sampling="uniform")


def test_flow_noisy_batch_is_deterministic_and_consistent():
    s, x0 = _flow(), _latents()
    a = noisy_batch(s, x0, torch.Generator().manual_seed(7))
    b = noisy_batch(s, x0, torch.Generator().manual_seed(7))
    c = noisy_batch(s, x0, torch.Generator().manual_seed(8))
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[1], c[1])
    x_t, t, target = a
    g = torch.Generator().manual_seed(7)  # documented draw order: noise, then σ
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(torch.randn((4,), generator=g))
    torch.testing.assert_close(t, sigma * 1000)
    assert torch.equal(target, noise - x0)
    sig = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - sig) * x0 + sig * noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_path_unchanged(prediction_type):
    """Bit for bit what noisy_batch returned before flow matching existed."""
    s, x0 = _ddpm(prediction_type), _latents()
    x_t, t, target = noisy_batch(s, x0, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    t_ref = torch.randint(0, s.config.num_train_timesteps, (4,), generator=g)
    assert t.dtype == torch.int64 and torch.equal(t, t_ref)
    assert torch.equal(x_t, s.add_noise(x0, noise, t_ref))
    ref = {"epsilon": noise, "v_prediction": s.get_velocity(x0, noise, t_ref), "sample": x0}[prediction_type]
    assert torch.equal(target, ref)
    assert torch.equal(add_noise(s, x0, noise, t_ref), s.add_noise(x0, noise, t_ref))
    assert torch.equal(sample_timesteps(s, 4, torch.Generator().manual_seed(5)),
                       torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(5)))


def test_min_snr_weights_known_values():
    from aptp.train.diffusion import min_snr_weights

    ddpm = _ddpm("epsilon")
    t = torch.arange(1000)
    # epsilon target with an unreachable γ: min(SNR, γ)/SNR = 1 everywhere
    assert torch.allclose(min_snr_weights(ddpm, t, 1e12), torch.ones(1000))
    # v target with an unreachable γ: SNR/(SNR + 1) = ᾱ, normalised to mean 1
    abar = _ddpm("v_prediction").alphas_cumprod.double()
    assert torch.allclose(min_snr_weights(_ddpm("v_prediction"), t, 1e12).double(), abar / abar.mean(), atol=1e-6)
    for kind in ("epsilon", "v_prediction", "sample"):
        w = min_snr_weights(_ddpm(kind), t, 5.0)
        assert w.dtype == torch.float32 and w.shape == (1000,)
        assert abs(w.double().mean().item() - 1.0) < 1e-6  # mean 1 over the uniform timesteps
        assert (w > 0).all()
    w = min_snr_weights(_ddpm("epsilon"), t, 5.0)
    assert w[0] < w[-1] / 10  # epsilon: nearly clean timesteps (SNR ≫ γ) weigh far less than noisy ones
    # flow matching: min((1 − σ)², γσ²) — σ = 0.1 → 0.05, σ = 0.5 → 0.25 at γ = 5
    flow = _flow()
    wf = min_snr_weights(flow, torch.tensor([100.0, 500.0]), 5.0)
    assert abs((wf[0] / wf[1]).item() - 0.2) < 1e-5
    with pytest.raises(ValueError):
        min_snr_weights(ddpm, t, 0.0)
