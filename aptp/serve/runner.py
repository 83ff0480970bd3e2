"""The model runner: one worker thread rendering the scheduler's batches on one device.

Everything is loaded once and stays resident: the teacher pipeline (VAE, text encoder(s),
scheduler config shared by all experts) and every expert U-Net, through
:class:`aptp.generate.ExpertPipeline` — the code path of ``aptp generate``, with the same
per-seed starting noise (:func:`aptp.generate.initial_latents`), so a request's image depends only
on its prompt, seed and expert, never on the requests that share its batch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from aptp.serve.scheduler import Batch, BatchScheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Params:
    """What every image of a batch shares."""

    steps: int
    guidance: float
    height: int
    width: int


class Model:
    """The loaded run: pipeline, experts, router and their metadata."""

    def __init__(self, run, *, full: bool = False, weights: str = "auto", device: str = "cpu",
                 dtype: str | None = None):
        from aptp.generate import ExpertPipeline, generation_size
        from aptp.train.teacher import load_teacher

        s = run.settings
        model = s.model if dtype is None else s.model.model_copy(update={"dtype": dtype})
        self.run = run
        self.full = full
        self.settings = s
        self.experts_meta = {} if full else {e["expert"]: e for e in run.experts()}
        pipe = load_teacher(model, device=device).pipeline
        self.ep = ExpertPipeline(run, pipe, weights=weights, cache=max(1, len(self.experts_meta)))
        for k in sorted(self.experts_meta):  # all experts resident from the start
            self.ep.denoiser(k)
        self.router = None if full else run.router()
        self._route_lock = threading.Lock()
        self._steps_ok: dict[int, str | None] = {}
        self.size = generation_size(s)  # (height, width) when a request names none
        self.scale = int(pipe.vae_scale_factor)

    @property
    def expert_ids(self) -> list[int | None]:
        return [None] if self.full else sorted(self.experts_meta)

    def macs_ratio(self, expert: int | None) -> float | None:
        return 1.0 if expert is None else self.experts_meta[expert].get("macs_ratio")

    def guidance(self, guidance: float | None) -> float:
        g = self.settings.generate
        return self.ep.guidance(g if guidance is None else g.model_copy(update={"guidance": guidance}))

    def check_steps(self, steps: int) -> str | None:
        """None if the sampling scheduler runs ``steps`` steps, else one line why (cached)."""
        if steps not in self._steps_ok:
            from aptp.errors import AptpUserError
            from aptp.generate import make_scheduler
            from aptp.schedulers import check_scheduler_steps

            try:
                check_scheduler_steps(make_scheduler(self.ep.pipe, self.settings.generate.scheduler), steps, "steps")
                self._steps_ok[steps] = None
            except AptpUserError as exc:
                self._steps_ok[steps] = " ".join(str(exc).split())
        return self._steps_ok[steps]

    def route(self, prompts: list[str]) -> list[dict[str, Any]]:
        """One record per prompt, as ``aptp route`` (cosine to the hard codes, no noise)."""
        if self.full:
            return [{"prompt": p, "expert": "full", "macs_ratio": 1.0, "similarity": None} for p in prompts]
        from aptp.experts import route_prompts

        with self._route_lock:  # the prompt encoder is not shared between threads
            return route_prompts(self.run, prompts, router=self.router,
                                 ratios={k: m.get("macs_ratio") for k, m in self.experts_meta.items()})

    def render(self, batch: Batch) -> list[Any]:
        """PIL images of ``batch``'s items, in item order."""
        from aptp.generate import Job

        p: Params = batch.params
        g = self.settings.generate.model_copy(update={"steps": p.steps, "guidance": p.guidance,
                                                      "batch_size": len(batch.items)})
        jobs = [Job(n, it.prompt, batch.expert, it.seed) for n, it in enumerate(batch.items)]
        images = self.ep.render(jobs, g, p.height, p.width)
        return [images[n] for n in range(len(jobs))]


class Runner:
    """The worker thread: ``scheduler.next_batch()`` → ``render`` → ``scheduler.finish``."""

    def __init__(self, scheduler: BatchScheduler, render: Callable[[Batch], list[Any]],
                 on_batch: Callable[[Batch, float], None] | None = None):
        self.scheduler = scheduler
        self.render = render
        self.on_batch = on_batch
        self.running: Batch | None = None
        self.batch_seconds = 0.0  # moving average, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="aptp-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while True:
            batch = self.scheduler.next_batch()
            if batch is None:
                return
            self.running = batch
            t0 = time.monotonic()
            try:
                images = self.render(batch)
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the server
                logger.exception("batch of %d for expert %s failed", len(batch.items), batch.expert)
                self.scheduler.finish(batch, error=exc)
            else:
                self.scheduler.finish(batch, images)
            finally:
                dt = time.monotonic() - t0
                self.batch_seconds = dt if self.batch_seconds == 0 else 0.8 * self.batch_seconds + 0.2 * dt
                self.running = None
                if self.on_batch is not None:
                    self.on_batch(batch, dt)

    def stop(self, timeout: float | None = None) -> None:
        """Close the scheduler, let the thread drain what is queued, and wait for it."""
        self.scheduler.close()
        if self._thread.is_alive():
            self._thread.join(timeout)
