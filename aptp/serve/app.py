"""The HTTP layer: a FastAPI app over the scheduler and the model runner.

``POST /v1/images/generations`` (a subset of the OpenAI images API plus ``seed``, ``steps`` and
``guidance``), ``POST /v1/route``, ``GET /healthz``, ``GET /readyz`` and ``GET /metrics``. Errors are
``{"error": {"message": ONE LINE, "type": ...}}`` with 422 (invalid body), 429 + ``Retry-After``
(queues full), 503 (loading or shutting down), 504 (past ``--timeout-s``; the request's waiting
work is dropped) and 500 (its batch failed; the server goes on).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from aptp.serve import metrics as m
from aptp.serve.runner import Model, Params, Runner
from aptp.serve.scheduler import Batch, BatchScheduler, QueueFull, Request, ShuttingDown

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
MAX_SIDE = 4096
MAX_N = 16


@dataclass
class ServeConfig:
    max_batch: int = 8
    max_wait_ms: float = 50.0
    queue_limit: int = 64
    timeout_s: float = 300.0


class ImageRequest(BaseModel):
    """OpenAI ``images/generations`` subset; unknown fields (``model``, ``quality``…) are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=4000)
    n: int = Field(1, ge=1, le=MAX_N)
    size: Optional[str] = Field(None, description='"WxH"; default: the run\'s resolution')
    response_format: Literal["b64_json"] = "b64_json"
    seed: Optional[int] = Field(None, ge=0, le=2**62, description="image i gets seed+i; default: random")
    steps: Optional[int] = Field(None, ge=1, le=1000)
    guidance: Optional[float] = Field(None, ge=0, le=100)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is blank")
        return v

    @field_validator("size")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is None:
            return v
        mt = _SIZE.match(v)
        if not mt:
            raise ValueError(f'{v!r} is not "WxH" (e.g. "512x512")')
        w, h = int(mt.group(1)), int(mt.group(2))
        if not (8 <= w <= MAX_SIDE and 8 <= h <= MAX_SIDE) or w % 8 or h % 8:
            raise ValueError(f"{v}: width and height must be multiples of 8 in 8..{MAX_SIDE}")
        return f"{w}x{h}"


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=1024)


def error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(str(message).split()), "type": kind}}, status_code=status,
                        headers=headers)


def _one_line(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "invalid request body"
    e = errs[0]
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}"


class Server:
    """The app's state: the model (loaded in the background), the scheduler, the runner, metrics."""

    def __init__(self, load: Callable[[], Model], config: ServeConfig, on_load_error: Callable[[BaseException], None]):
        self.load = load
        self.config = config
        self.on_load_error = on_load_error
        self.model: Model | None = None
        self.scheduler = BatchScheduler(config.max_batch, config.max_wait_ms / 1000.0, config.queue_limit)
        self.runner: Runner | None = None
        self.state = "loading"  # loading | ready | draining | failed
        r = self.registry = m.Registry()
        self.requests = r.add(m.Counter("aptp_http_requests_total", "HTTP requests by endpoint and status code.",
                                        ("endpoint", "code")))
        r.add(m.Gauge("aptp_queue_depth", "Images waiting, per expert.", ("expert",), self._depths))
        r.add(m.Gauge("aptp_running_batch_size", "Images in the batch on the device now (0 = idle).", (),
                      lambda: {(): 0 if self.runner is None or self.runner.running is None
                               else len(self.runner.running.items)}))
        r.add(m.Gauge("aptp_ready", "1 when every expert is loaded and requests are accepted.", (),
                      lambda: {(): 1 if self.state == "ready" else 0}))
        self.batch_size = r.add(m.Histogram("aptp_batch_size", "Images per batch, per expert.",
                                            (1, 2, 4, 8, 16, 32, 64), ("expert",)))
        self.batch_seconds = r.add(m.Histogram("aptp_batch_seconds", "Wall time of one batch on the device.",
                                               (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), ("expert",)))
        self.latency = r.add(m.Histogram("aptp_request_seconds", "Image request latency (arrival to response), "
                                         "by status code.", (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                         ("code",)))
        self.images = r.add(m.Counter("aptp_images_total", "Images generated, per expert.", ("expert",)))

    @staticmethod
    def label(expert: int | None) -> str:
        return "full" if expert is None else str(expert)

    def _depths(self) -> dict[tuple[str, ...], float]:
        ids = self.model.expert_ids if self.model is not None else []
        d = {(self.label(k),): 0 for k in ids}
        d.update({(self.label(k),): v for k, v in self.scheduler.depths().items()})
        return d

    def _on_batch(self, batch: Batch, seconds: float) -> None:
        e = self.label(batch.expert)
        self.batch_size.observe(len(batch.items), e)
        self.batch_seconds.observe(seconds, e)
        self.images.inc(e, by=len(batch.items))

    def start_loading(self) -> None:
        def work() -> None:
            try:
                self.model = self.load()
                self.runner = Runner(self.scheduler, self.model.render, self._on_batch)
                self.runner.start()
                self.state = "ready"
                logger.info("ready: %d expert(s) resident", len(self.model.expert_ids))
            except BaseException as exc:  # noqa: BLE001 - reported by /readyz and the CLI
                self.state = "failed"
                self.on_load_error(exc)

        threading.Thread(target=work, name="aptp-load", daemon=True).start()

    def stop(self) -> None:
        self.state = "draining"
        if self.runner is not None:
            self.runner.stop(timeout=self.config.timeout_s + 5)

    def retry_after(self) -> str:
        """Seconds until the queues have room, roughly: the batches ahead times a batch's time."""
        r = self.runner
        per_batch = r.batch_seconds if r is not None and r.batch_seconds > 0 else 1.0
        ahead = math.ceil(max(1, self.scheduler.pending) / self.config.max_batch)
        return str(max(1, min(3600, math.ceil(per_batch * ahead))))


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start_loading()
        yield
        # uvicorn has stopped accepting and waited for the requests in flight; drain and stop
        await run_in_threadpool(server.stop)

    app = FastAPI(title="aptp serve", lifespan=lifespan)
    app.state.server = server
    known = {"/v1/images/generations", "/v1/route", "/healthz", "/readyz", "/metrics"}

    @app.middleware("http")
    async def count(request: HTTPRequest, call_next):
        path = request.url.path
        response = await call_next(request)
        server.requests.inc(path if path in known else "other", str(response.status_code))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, exc: RequestValidationError):
        return error(422, _one_line(exc), "invalid_request_error")

    def not_ready() -> JSONResponse | None:
        if server.state == "ready":
            return None
        return error(503, f"not ready ({server.state})", "unavailable", {"Retry-After": "1"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if server.state != "ready":
            return JSONResponse({"status": server.state}, status_code=503)
        mdl = server.model
        return {"status": "ready", "experts": [server.label(k) for k in mdl.expert_ids],
                "queue_limit": server.config.queue_limit, "pending": server.scheduler.pending}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.registry.render(), media_type=m.CONTENT_TYPE)

    @app.post("/v1/route")
    async def route(body: RouteRequest):
        if (resp := not_ready()) is not None:
            return resp
        return {"data": await run_in_threadpool(server.model.route, body.prompts)}

    @app.post("/v1/images/generations")
    async def generations(body: ImageRequest):
        t0 = time.monotonic()
        resp = await _generate(body, t0)
        server.latency.observe(time.monotonic() - t0, str(resp.status_code))
        return resp

    async def _generate(body: ImageRequest, t0: float) -> JSONResponse:
        if (resp := not_ready()) is not None:
            return resp
        mdl = server.model
        if body.n > server.config.queue_limit:
            return error(422, f"n: {body.n} images exceed the queue limit of {server.config.queue_limit}",
                         "invalid_request_error")
        if body.size is None:
            height, width = mdl.size
        else:
            width, height = (int(x) for x in body.size.split("x"))
        if width % mdl.scale or height % mdl.scale:
            return error(422, f"size: {width}x{height} is not a multiple of the VAE's factor {mdl.scale}",
                         "invalid_request_error")
        steps = body.steps if body.steps is not None else mdl.settings.generate.steps
        why = await run_in_threadpool(mdl.check_steps, steps)
        if why is not None:
            return error(422, why, "invalid_request_error")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        if mdl.full:
            expert = None
        else:
            expert = (await run_in_threadpool(mdl.route, [body.prompt]))[0]["expert"]
        params = Params(steps=steps, guidance=mdl.guidance(body.guidance), height=height, width=width)

        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def resolve(req: Request) -> None:
            if not fut.done():
                fut.set_result(req)

        req = Request(expert, params, [body.prompt] * body.n, [seed + i for i in range(body.n)],
                      on_done=lambda r: loop.call_soon_threadsafe(resolve, r))
        try:
            server.scheduler.submit(req)
        except QueueFull:
            return error(429, f"the queues are full ({server.config.queue_limit} images waiting); retry later",
                         "rate_limit_exceeded", {"Retry-After": server.retry_after()})
        except ShuttingDown:
            return error(503, "shutting down", "unavailable")
        left = server.config.timeout_s - (time.monotonic() - t0)
        try:
            await asyncio.wait_for(fut, timeout=max(0.001, left))
        except asyncio.TimeoutError:
            server.scheduler.cancel(req)
            return error(504, f"not done within {server.config.timeout_s:g} s; its work was dropped", "timeout")
        except asyncio.CancelledError:  # the client went away: drop its waiting work
            server.scheduler.cancel(req)
            raise
        if req.error is not None:
            return error(500, f"generation failed: {type(req.error).__name__}: {req.error}", "server_error")
        data = await run_in_threadpool(_encode, req.results)
        ratio = mdl.macs_ratio(expert)
        shown = "full" if expert is None else expert  # as in generate's manifest
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": b, "expert": shown, "macs_ratio": ratio, "seed": s}
                     for b, s in zip(data, req.seeds)],
            "expert": shown, "macs_ratio": ratio, "seed": seed, "size": f"{width}x{height}",
            "steps": steps, "guidance": params.guidance,
        })

    return app


def _encode(images: list[Any]) -> list[str]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out
