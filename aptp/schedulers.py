"""Whether a sampling scheduler can run a given number of denoising steps, found out for real.

A diffusers scheduler may accept ``set_timesteps(n)`` and still fail inside the sampling loop
(PNDM without ``skip_prk_steps`` needs at least 4 steps: ``operands could not be broadcast
together``), or reject ``n`` outright (more steps than its training timesteps). Which counts work
depends on the scheduler class *and* its config, so :func:`check_scheduler_steps` does not guess
a threshold: it runs the scheduler's own loop — ``set_timesteps``, ``scale_model_input``,
``step`` — on a tiny all-zero latent with all-zero model outputs (milliseconds), on a copy, and
turns a failure into one line naming the scheduler, the steps asked, the nearest count that
works and another scheduler that can run them.

:func:`scheduler_for_model` builds the scheduler that ``aptp generate`` will use for a
``--model`` value from the model's ``scheduler/`` config alone (no weights), so commands can
check their settings before loading anything.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from aptp.errors import AptpUserError

logger = logging.getLogger(__name__)

#: ``generate.scheduler`` names → diffusers class names (what ``aptp.generate.make_scheduler`` builds).
SCHEDULER_CLASSES: dict[str, str] = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler"}

# How far the search for a working count goes from the count asked, each way.
_SEARCH = 32


class SchedulerStepsError(AptpUserError):
    """The configured scheduler can not run the requested number of denoising steps."""


def _class(name: str):
    import diffusers

    return getattr(diffusers, SCHEDULER_CLASSES[name])


def _name_of(scheduler: Any) -> str:
    cls = type(scheduler).__name__
    return next((k for k, v in SCHEDULER_CLASSES.items() if v == cls), cls)


def _copy(scheduler: Any, cls=None):
    return (cls or type(scheduler)).from_config(scheduler.config)


def dry_run(scheduler: Any, steps: int) -> str | None:
    """Run ``scheduler``'s sampling loop for ``steps`` steps on zeros; None if it works, else why.

    The scheduler is copied first (``from_config``), so its state is left untouched.
    """
    trained = getattr(scheduler.config, "num_train_timesteps", None)
    if trained is not None and steps > trained:  # some schedulers "run" it by repeating timesteps
        return f"more than its {trained} training timesteps"
    sched = _copy(scheduler)
    try:
        # flow-matching schedulers with resolution-dependent shifting (Flux) need the shift ``mu``
        extra = {"mu": 1.0} if getattr(sched.config, "use_dynamic_shifting", False) else {}
        sched.set_timesteps(steps, **extra)
        sample = torch.zeros(1, 4, 4, 4)
        scale = getattr(sched, "scale_model_input", None)  # flow matching has none
        for t in sched.timesteps:
            model_input = scale(sample, t) if scale is not None else sample
            sample = sched.step(torch.zeros_like(model_input), t, sample).prev_sample
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run this many steps"
        text = " ".join(str(exc).split())
        return f"{type(exc).__name__}: {text[:90] + '...' if len(text) > 90 else text}"
    if not torch.isfinite(sample).all():
        return "the sampling loop produced non-finite values"
    return None


def nearest_working_steps(scheduler: Any, steps: int) -> tuple[int | None, int | None]:
    """(largest working count below ``steps``, smallest working count above it), each None if
    none within the search window (never above the scheduler's training timesteps)."""
    limit = int(getattr(scheduler.config, "num_train_timesteps", steps + _SEARCH) or steps + _SEARCH)
    below = next((n for n in range(steps - 1, max(0, steps - 1 - _SEARCH), -1) if dry_run(scheduler, n) is None),
                 None)
    above = next((n for n in range(steps + 1, min(limit, steps + _SEARCH) + 1) if dry_run(scheduler, n) is None),
                 None)
    return below, above


def check_scheduler_steps(scheduler: Any, steps: int, option: str = "--steps") -> None:
    """Raise one line if ``scheduler`` can not run ``steps`` denoising steps.

    Args:
        scheduler: A diffusers scheduler (it is not modified).
        steps: The number of denoising steps asked for.
        option: How the user sets the count, for the message.

    Raises:
        SchedulerStepsError: naming the scheduler, ``steps``, the nearest count that works and
            another scheduler that runs ``steps`` (``--set generate.scheduler=...``), if any.
    """
    if steps < 1:
        raise SchedulerStepsError(f"{option} {steps}: the number of denoising steps must be at least 1")
    why = dry_run(scheduler, steps)
    if why is None:
        return
    name = _name_of(scheduler)
    below, above = nearest_working_steps(scheduler, steps)
    if above is not None and below is None:
        use = f"use {option} {above} or more"
    elif below is not None and above is None:
        use = f"use {option} {below} or fewer"
    elif below is not None and above is not None:
        use = f"use {option} {below} or {above}"
    else:
        use = "use another step count"
    others = []
    for other in SCHEDULER_CLASSES:
        if other == name:
            continue
        try:
            alternative = _copy(scheduler, _class(other))
        except Exception:  # noqa: BLE001 - a config that the other class does not take
            continue
        if dry_run(alternative, steps) is None:
            others.append(f"--set generate.scheduler={other}")
    tail = f", or another scheduler: {' or '.join(others)}" if others else ""
    raise SchedulerStepsError(
        f"{option} {steps}: the {name} scheduler ({type(scheduler).__name__}) cannot run {steps} denoising "
        f"steps ({why}); {use}{tail}"
    )


def scheduler_for_model(model: str, name: str):
    """The scheduler ``aptp generate`` builds for ``--model model`` with ``generate.scheduler=name``,
    from the model's ``scheduler/`` config only (no weights, no download); None when that config
    is not at hand (a bare U-Net folder, a hub model not in the cache): then nothing is checked
    before loading."""
    from aptp.models.registry import resolve_model

    try:
        ref = resolve_model(model)
        cls = _class(name)
        if ref.source is None:
            return None
        return cls.from_pretrained(ref.source, subfolder="scheduler", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the loading path reports problems with the model itself
        logger.debug("no scheduler config for %s (%s); steps not checked up front", model, exc)
        return None


def check_model_steps(model: str, name: str, steps: int, option: str = "--steps") -> None:
    """:func:`check_scheduler_steps` for the scheduler of ``model`` (nothing when its config is not at hand)."""
    if steps < 1:
        raise SchedulerStepsError(f"{option} {steps}: the number of denoising steps must be at least 1")
    scheduler = scheduler_for_model(model, name)
    if scheduler is not None:
        check_scheduler_steps(scheduler, steps, option=option)
