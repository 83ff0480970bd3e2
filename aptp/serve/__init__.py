"""``aptp serve``: the mixture behind an HTTP endpoint (DESIGN.md §6 "Serving").

Three layers, each unaware of the one above it:

- :mod:`aptp.serve.scheduler` — one queue per expert, batch formation and backpressure (pure
  Python, no torch, no HTTP);
- :mod:`aptp.serve.runner` — the model runner: one worker thread that takes the next batch from
  the scheduler and renders it on the device through :class:`aptp.generate.ExpertPipeline`
  (all experts resident, VAE / text encoder / scheduler shared);
- :mod:`aptp.serve.app` — the FastAPI app (OpenAI images API subset, routing, health, metrics).
"""
