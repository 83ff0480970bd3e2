"""Open-loop load on `aptp serve`: the mixture vs the teacher vs batching off, side by side.

    python bench/serve_load.py RUN_DIR [--rates 1,2,4] [--requests 24] [--max-seconds 20] [--slo 5]

Starts three servers on free loopback ports in one run — ``mixture`` (the run's experts, dynamic
batching up to ``--max-batch``), ``full`` (``--full``: the teacher alone, same batching) and
``batch-1`` (the experts with ``--max-batch 1``: per-request execution, the dynamic-pruning
alternative) — waits for ``/readyz``, warms each up, then for every rate sends the same Poisson
arrival schedule (open loop: requests go out at their times whatever the replies) of the run's
validation captions to each server in turn, one server under load at a time. Each phase is bounded
in count (``--requests``) and time (``--max-seconds`` of arrivals; replies are awaited up to the
servers' ``--timeout-s``). Reports per server and rate: throughput (images/s), p50 / p95 / p99
latency of the 200s, the share of requests answered 200 within ``--slo`` seconds, and per server
the highest rate whose share reaches ``--target``. Loopback only; the servers are always stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run_dir: str, name: str, extra: list[str], a, log_dir: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    cmd = [sys.executable, "-m", "aptp", "serve", run_dir, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(a.max_batch), "--max-wait-ms", str(a.max_wait_ms), "--queue-limit",
           str(a.queue_limit), "--timeout-s", str(a.timeout_s), "--quiet", *extra]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    log = open(log_dir / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return f"http://127.0.0.1:{port}", proc


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: server exited {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url}: not ready after {seconds:g} s")


async def phase(url: str, prompts: list[str], arrivals: np.ndarray, body: dict, timeout: float) -> list[dict]:
    """Send prompt i at arrivals[i] (seconds from now); one record per request."""
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        t0 = time.monotonic()

        async def one(i: int) -> dict:
            await asyncio.sleep(max(0.0, t0 + arrivals[i] - time.monotonic()))
            sent = time.monotonic()
            try:
                r = await client.post("/v1/images/generations", json=body | {"prompt": prompts[i], "seed": i})
                code = r.status_code
            except httpx.HTTPError:
                code = 0  # transport failure / client timeout
            done = time.monotonic()
            return {"sent": sent - t0, "done": done - t0, "latency": done - sent, "code": code}

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def summarize(records: list[dict], slo: float) -> dict:
    ok = [r for r in records if r["code"] == 200]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    span = (max(r["done"] for r in ok) - min(r["sent"] for r in records)) if ok else float("nan")
    codes: dict[str, int] = {}
    for r in records:
        codes[str(r["code"])] = codes.get(str(r["code"]), 0) + 1
    return {"sent": len(records), "ok": len(ok), "codes": codes,
            "throughput": len(ok) / span if ok and span > 0 else 0.0,
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)),
            "within_slo": sum(r["latency"] <= slo for r in ok) / len(records)}


def plot(results: dict[str, dict[float, dict]], slo: float, path: str, max_wait_ms: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, res in results.items():
        rates = sorted(res)
        ax1.plot(rates, [100 * res[r]["within_slo"] for r in rates], marker="o", label=name)
        ax2.plot(rates, [res[r]["p95"] for r in rates], marker="o", label=name)
    ax1.set(xlabel="offered load (requests/s)", ylabel=f"% within {slo:g} s", ylim=(0, 105))
    ax2.set(xlabel="offered load (requests/s)", ylabel="p95 latency (s)")
    ax2.axhline(slo, color="grey", lw=0.8, ls="--")
    ax1.legend()
    if max_wait_ms is not None:
        fig.suptitle(f"aptp serve, open-loop Poisson load (max wait {max_wait_ms:g} ms)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--rates", default="1,2,4", help="Requests/s, comma-separated.")
    ap.add_argument("--requests", type=int, default=24, help="Requests per server and rate (at most).")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="Arrivals per phase stop after this.")
    ap.add_argument("--slo", type=float, default=5.0, help="Latency objective, seconds.")
    ap.add_argument("--target", type=float, default=0.95, help="Share within the SLO that counts as sustained.")
    ap.add_argument("--steps", type=int, default=None, help="Denoising steps (default: the run's).")
    ap.add_argument("--size", default=None, help='"WxH" (default: the run\'s resolution).')
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=100.0)
    ap.add_argument("--queue-limit", type=int, default=256)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per server.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="Write a PNG: share within the SLO and p95 per rate.")
    ap.add_argument("--from-json", default=None, help="Only redraw --plot from an earlier --json.")
    a = ap.parse_args()
    if a.from_json:
        d = json.loads(Path(a.from_json).read_text())
        plot({k: {float(r): s for r, s in v.items()} for k, v in d["results"].items()}, d["args"]["slo"],
             a.plot or str(Path(a.from_json).with_suffix(".png")), d["args"].get("max_wait_ms"))
        return

    from aptp.data import build_dataset
    from aptp.rundir import RunDir

    run = RunDir(a.run_dir)
    captions = build_dataset(run.settings.data, split="validation").captions()
    rates = [float(x) for x in a.rates.split(",")]
    body: dict = {}
    if a.steps is not None:
        body["steps"] = a.steps
    if a.size is not None:
        body["size"] = a.size
    log_dir = Path(a.json).parent if a.json else Path(".")
    variants = {"mixture": [], "full": ["--full"], "batch-1": []}  # batch-1: --max-batch 1
    servers: dict[str, tuple[str, subprocess.Popen]] = {}
    results: dict[str, dict[float, dict]] = {k: {} for k in variants}
    try:
        for name, extra in variants.items():
            args = argparse.Namespace(**vars(a))
            if name == "batch-1":
                args.max_batch = 1
            servers[name] = start(a.run_dir, name, extra, args, log_dir)
        for name, (url, proc) in servers.items():
            wait_ready(url, proc)
            asyncio.run(phase(url, captions[:4], np.zeros(4), body, a.timeout_s))  # warm-up
        rng = np.random.default_rng(a.seed)
        for rate in rates:
            gaps = rng.exponential(1.0 / rate, size=a.requests)
            arrivals = np.cumsum(gaps) - gaps[0]
            arrivals = arrivals[arrivals <= a.max_seconds]
            prompts = [captions[(i + int(rate * 1000)) % len(captions)] for i in range(len(arrivals))]
            for name, (url, _) in servers.items():  # the same schedule for each, one at a time
                recs = asyncio.run(phase(url, prompts, arrivals, body, a.timeout_s + 10))
                results[name][rate] = summarize(recs, a.slo)
                s = results[name][rate]
                print(f"rate {rate:g}/s {name:8s} {s['throughput']:.2f} img/s p50 {s['p50']:.2f} p95 {s['p95']:.2f} "
                      f"p99 {s['p99']:.2f} within SLO {s['within_slo']:.0%} codes {s['codes']}", flush=True)
    finally:
        for url, proc in servers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for url, proc in servers.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    sustained = {name: max([r for r, s in res.items() if s["within_slo"] >= a.target], default=0.0)
                 for name, res in results.items()}
    print(f"\n| rate (req/s) | server | images/s | p50 s | p95 s | p99 s | within {a.slo:g} s SLO |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for rate in rates:
        for name in variants:
            s = results[name][rate]
            print(f"| {rate:g} | {name} | {s['throughput']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} "
                  f"| {s['within_slo']:.0%} |")
    print(f"\nhighest rate with >= {a.target:.0%} within the SLO: "
          + ", ".join(f"{k} {v:g}/s" for k, v in sustained.items()))
    if sustained["full"] > 0:
        print(f"mixture / full: {sustained['mixture'] / sustained['full']:.2f}x")
    if a.plot:
        plot(results, a.slo, a.plot, a.max_wait_ms)
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "results": {k: {str(r): s for r, s in v.items()}
                                                                          for k, v in results.items()},
                                            "sustained": sustained}, indent=2))


if __name__ == "__main__":
    main()
