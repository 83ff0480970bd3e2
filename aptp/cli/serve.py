"""``aptp serve``: the mixture behind an HTTP endpoint with per-expert dynamic batching."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer

from aptp.cli.common import command, err, setup_logging
from aptp.errors import AptpUserError

logger = logging.getLogger(__name__)


def _check_port(host: str, port: int) -> None:
    """One line (exit 2) for a port that is taken, before minutes of loading."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AptpUserError(f"--host {host}: {exc.strerror or exc}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise AptpUserError(f"--host {host} --port {port}: {exc.strerror or exc}; choose another port") from None


@command
def serve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with materialized experts.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per batch (1 = no batching).")] = 8,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest an expert's oldest request waits for its "
                                               "batch to fill before the batch runs anyway.")] = 50.0,
    queue_limit: Annotated[int, typer.Option(min=1, help="Most images waiting across all experts; beyond it "
                                             "requests get 429 with Retry-After.")] = 64,
    timeout_s: Annotated[float, typer.Option(min=0.001, help="A request not done by then gets 504 and its "
                                             "waiting work is dropped.")] = 300.0,
    weights: Annotated[str, typer.Option(help="auto (fine-tuned if present), finetuned or initial.")] = "auto",
    full: Annotated[bool, typer.Option("--full", help="Serve the unpruned teacher alone (for comparison).")] = False,
    device: Annotated[str, typer.Option(help="Torch device, e.g. cpu, cuda, cuda:1 (one process per device).")] = "cpu",
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: the run's).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (default: torch's).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
) -> None:
    """Serve RUN_DIR over HTTP: OpenAI-style /v1/images/generations, /v1/route, /healthz, /readyz, /metrics."""
    from aptp.rundir import RunDir

    if weights not in ("auto", "finetuned", "initial"):
        raise AptpUserError(f"--weights {weights}: expected auto, finetuned or initial")
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise AptpUserError(f"--dtype {dtype}: expected float32, float16 or bfloat16")
    setup_logging(quiet)
    run = RunDir(run_dir)
    if not full:  # cheap checks before the server starts: one line, exit 2
        n = len(run.experts())
        for k in range(n):
            run.expert_dir(k, weights)
        if not (run.path / "router" / "config.json").is_file():
            run.router()  # raises the one-line error
    import torch
    import uvicorn

    from aptp.serve.app import ServeConfig, Server, create_app
    from aptp.serve.runner import Model

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise AptpUserError(f"--device {device}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AptpUserError(f"--device {device}: CUDA is not available here; use --device cpu")
    _check_port(host, port)
    if threads is not None:
        torch.set_num_threads(threads)
    failure: dict[str, BaseException] = {}
    uv: dict[str, uvicorn.Server] = {}

    def on_load_error(exc: BaseException) -> None:
        failure["exc"] = exc
        if "server" in uv:
            uv["server"].should_exit = True

    server = Server(lambda: Model(run, full=full, weights=weights, device=device, dtype=dtype),
                    ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_limit=queue_limit,
                                timeout_s=timeout_s), on_load_error)
    config = uvicorn.Config(create_app(server), host=host, port=port, log_level="warning" if quiet else "info",
                            timeout_graceful_shutdown=int(timeout_s) + 10, access_log=not quiet)
    uv["server"] = uvicorn.Server(config)
    stopped: list[int] = []
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; with a handler
    # of ours in place that is a no-op, so SIGTERM/SIGINT end in exit 0 after the drain
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, f: stopped.append(s))
    err.print(f"aptp serve: {run.path} on http://{host}:{port} ({'teacher' if full else 'mixture'}, "
              f"max batch {max_batch}, max wait {max_wait_ms:g} ms, queue limit {queue_limit})", markup=False)
    uv["server"].run()
    if "exc" in failure:
        exc = failure["exc"]
        if isinstance(exc, AptpUserError):
            raise exc
        raise RuntimeError(f"loading the model failed: {type(exc).__name__}: {exc}") from exc
    err.print("aptp serve: stopped", markup=False)
