"""`aptp serve` end to end: a real server subprocess on a free loopback port, a real HTTP client."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from aptp.cli.main import app

httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.integration

PROMPTS = ["a red circle", "the word SUN in white letters on a black background",
           "two green triangles left of a yellow star", "a small blue square in the top left",
           "a purple heart", "a large orange star"]
GEN = {"steps": 3, "guidance": 3.0, "size": "16x16"}


def cli(*args: str):
    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def run(tiny_pipeline_dir, tmp_path_factory):
    """A pruned and materialized tiny run (the pattern of test_experts.py's fixture, fewer steps:
    serving needs experts and a router, not good ones)."""
    root = tmp_path_factory.mktemp("serve")
    run = root / "run"
    res = cli("prune", "--model", str(tiny_pipeline_dir), "--resolution", "16", "--batch-size", "8",
              "--warmup-steps", "1", "--steps", "2", "--experts", "4", "--output", str(run), "--quiet",
              "--set", "data.max_samples=16", "--set", f"router.embedding_cache={root / 'emb'}",
              "--set", "prune.lr=0.5", "--set", "prune.lr_warmup_steps=1", "--set", "prune.budget=0.5")
    assert res.exit_code == 0, res.output
    res = cli("materialize", str(run), "--quiet")
    assert res.exit_code == 0, res.output
    return run


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(run, tmp_path, *args: str):
    """Start `aptp serve` as a subprocess, wait for /readyz, and always kill it afterwards."""
    port = free_port()
    log = open(tmp_path / f"serve-{port}.log", "w+")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "aptp", "serve", str(run), "--port", str(port), "--threads", "1",
                             "--weights", "initial", *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}: {open(log.name).read()}"
            assert time.monotonic() < deadline, open(log.name).read()
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        proc.log_path = log.name
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def url(run, tmp_path_factory):
    with server(run, tmp_path_factory.mktemp("serve-log"), "--max-batch", "4", "--max-wait-ms", "300",
                "--timeout-s", "120") as (u, _):
        yield u


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def post(url: str, path: str, body, **kw):
    return httpx.post(url + path, json=body, timeout=kw.pop("timeout", 120), **kw)


def test_concurrent_requests_equal_generate(run, url, tmp_path):
    routed = post(url, "/v1/route", {"prompts": PROMPTS}).json()["data"]
    cli_route = cli("route", str(run), *PROMPTS)
    assert [r["expert"] for r in routed] == [json.loads(x)["expert"] for x in cli_route.stdout.splitlines()]
    # all requests at once: the scheduler batches them per expert as they arrive
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        futs = [pool.submit(post, url, "/v1/images/generations", {"prompt": p, "seed": i, **GEN})
                for i, p in enumerate(PROMPTS)]
        two = pool.submit(post, url, "/v1/images/generations", {"prompt": PROMPTS[0], "seed": 0, "n": 2, **GEN})
        replies = [f.result() for f in futs]
        pair = two.result()
    assert all(r.status_code == 200 for r in replies + [pair]), [r.text[:200] for r in replies + [pair]]
    res = cli("generate", str(run), *PROMPTS, "--output", str(tmp_path / "gen"), "--steps", "3", "--guidance", "3",
              "--batch-size", "4", "--height", "16", "--width", "16", "--weights", "initial", "--quiet")
    assert res.exit_code == 0, res.output
    manifest = [json.loads(x) for x in (tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()]
    ratios = {e["expert"]: e["macs_ratio"] for e in json.loads((run / "experts.json").read_text())["experts"]}
    for i, (r, m) in enumerate(zip(replies, manifest)):
        (img,) = r.json()["data"]
        assert img["expert"] == m["expert"] == routed[i]["expert"] and img["seed"] == m["seed"] == i
        assert img["macs_ratio"] == ratios[m["expert"]]
        ref = np.asarray(Image.open(tmp_path / "gen" / m["file"]), dtype=np.int16)
        # the same (prompt, seed, expert) in other batch shapes: fp32 matmuls reassociate with the
        # batch size and thread count, so allow at most one 8-bit level, as test_experts does
        assert np.abs(png(img["b64_json"]) - ref).max() <= 1, i
    # image i of a request gets seed + i; image 0 is the one-image request's
    data = pair.json()["data"]
    assert [d["seed"] for d in data] == [0, 1]
    assert np.abs(png(data[0]["b64_json"]) - png(replies[0].json()["data"][0]["b64_json"])).max() <= 1
    assert len({r["expert"] for r in routed}) >= 2  # the requests above were for different experts


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": "   "}, {"prompt": "x", "n": 0}, {"prompt": "x", "n": 1000},
    {"prompt": "x", "size": "big"}, {"prompt": "x", "size": "15x16"}, {"prompt": "x", "response_format": "url"},
    {"prompt": "x", "steps": 0}, {"prompt": "x", "steps": "many"}, {"prompt": "x", "guidance": -1},
    {"prompt": "x", "seed": -3}, {"prompt": 7}, ["a list"], "not json",
])
def test_invalid_bodies_get_422_with_one_line(url, body):
    if body == "not json":
        r = httpx.post(url + "/v1/images/generations", content=b"{not json", timeout=30,
                       headers={"content-type": "application/json"})
    else:
        r = post(url, "/v1/images/generations", body)
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert msg and "\n" not in msg and len(msg) < 300
    assert post(url, "/v1/route", {"prompts": []}).status_code == 422
    assert httpx.get(url + "/healthz").status_code == 200


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (\S+)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[str, float]]]:
    """A strict reading of the text format: TYPE before samples, every sample line well formed."""
    types, samples = {}, {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            types[name] = kind
            continue
        mt = _SAMPLE.match(line)
        assert mt, f"not a Prometheus sample line: {line!r}"
        name, value = mt.group(1), float(mt.group(4))
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or base in types, f"sample before its TYPE: {line!r}"
        samples.setdefault(name, []).append((mt.group(2) or "", value))
    return samples


def test_metrics_parse_as_prometheus_text(url):
    post(url, "/v1/images/generations", {"prompt": ""})  # a 422 to count
    assert post(url, "/v1/images/generations", {"prompt": PROMPTS[0], "seed": 3, **GEN}).status_code == 200
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = parse_prometheus(r.text)
    codes = {lab for lab, _ in s["aptp_http_requests_total"] if "/v1/images/generations" in lab}
    assert any('code="422"' in c for c in codes) and any('code="200"' in c for c in codes)
    assert len(s["aptp_queue_depth"]) == 4  # one per expert, zero when idle
    for hist in ("aptp_batch_size", "aptp_request_seconds"):
        counts = dict(s[hist + "_count"])
        for lab, n in counts.items():
            buckets = [v for b, v in s[hist + "_bucket"] if b.startswith(lab[:-1])]
            assert buckets == sorted(buckets) and buckets[-1] == n  # cumulative, +Inf == count
    assert dict(s["aptp_ready"])[""] == 1


def test_queue_limit_burst_disconnect_and_sigterm(run, tmp_path):
    with server(run, tmp_path, "--queue-limit", "2", "--max-batch", "2", "--max-wait-ms", "20",
                "--timeout-s", "120") as (url, proc):
        body = {"prompt": PROMPTS[1], "steps": 20, "guidance": 3.0, "size": "16x16"}
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda i: post(url, "/v1/images/generations", body | {"seed": i}), range(16)))
        codes = [r.status_code for r in replies]
        assert 429 in codes and 200 in codes and not any(c >= 500 for c in codes), codes
        for r in replies:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1 and "\n" not in r.json()["error"]["message"]
        # a client that gives up mid-request does not break the batch it is in
        with pytest.raises(httpx.TimeoutException):
            # 400 steps: seconds even on a fast quiet machine (40 finished inside 0.3 s once)
            post(url, "/v1/images/generations", body | {"seed": 99, "steps": 400}, timeout=0.3)
        assert httpx.get(url + "/readyz").status_code == 200
        ok = post(url, "/v1/images/generations", {"prompt": PROMPTS[2], "seed": 1, **GEN})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 1

        # SIGTERM while a batch runs: its responses are delivered, then exit 0
        long = {"prompt": PROMPTS[0], "steps": 60, "guidance": 3.0, "size": "16x16"}
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(post, url, "/v1/images/generations", long | {"seed": i}) for i in range(2)]
            deadline = time.monotonic() + 60
            while True:  # wait until the batch is on the device
                s = parse_prometheus(httpx.get(url + "/metrics").text)
                if dict(s["aptp_running_batch_size"])[""] > 0:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            done = [f.result() for f in futs]
        assert [r.status_code for r in done] == [200, 200], [r.text[:200] for r in done]
        assert all(len(r.json()["data"]) == 1 for r in done)
        assert proc.wait(timeout=60) == 0, open(proc.log_path).read()


def test_scheduler_policy_and_timeouts_in_process():
    """The batch policy on a fake clock, and 504 / dropped work through the app with a fake model."""
    from aptp.serve.scheduler import BatchScheduler, QueueFull, Request

    t = [0.0]
    s = BatchScheduler(max_batch=2, max_wait=1.0, queue_limit=5, clock=lambda: t[0])
    a1 = Request(0, "p", ["a"], [0])
    s.submit(a1)
    t[0] = 0.1
    b1, b2 = Request(1, "p", ["b"], [1]), Request(1, "p", ["b"], [2])
    s.submit(b1)
    s.submit(b2)
    assert s.take().items[0].request is b1  # expert 1 is full: ready before 0 has waited long enough
    assert s.take() is None  # expert 0 has waited 0.9 s of 1
    t[0] = 1.0
    s.submit(Request(1, "p", ["c"], [3]))
    t[0] = 2.5
    assert s.take().expert == 0  # both waited past max_wait: the oldest head goes first
    assert s.take().expert == 1
    s.submit(Request(2, "p", ["x"] * 5, [0] * 5))
    with pytest.raises(QueueFull):
        s.submit(Request(2, "p", ["y"], [0]))
    mixed = [Request(3, "p", ["q"], [0]), Request(3, "other", ["r"], [0]), Request(3, "p", ["s"], [0])]
    s2 = BatchScheduler(max_batch=4, max_wait=0.0, queue_limit=9)
    for r in mixed:
        s2.submit(r)
    assert [it.request for it in s2.take().items] == [mixed[0], mixed[2]]  # only like parameters share a batch
    s2.cancel(mixed[1])
    assert s2.pending == 0 and s2.take() is None

    from starlette.testclient import TestClient

    from aptp.serve.app import ServeConfig, Server, create_app

    gate = threading.Event()

    class FakeModel:
        full, size, scale, expert_ids = False, (16, 16), 8, [0]
        settings = type("S", (), {"generate": type("G", (), {"steps": 3})()})()

        def check_steps(self, steps):
            return None

        def route(self, prompts):
            return [{"prompt": p, "expert": 0, "macs_ratio": 0.5, "similarity": 1.0} for p in prompts]

        def guidance(self, g):
            return 3.0 if g is None else g

        def macs_ratio(self, k):
            return 0.5

        def render(self, batch):
            gate.wait(10)
            return [Image.new("RGB", (16, 16)) for _ in batch.items]

    srv = Server(FakeModel, ServeConfig(max_batch=1, max_wait_ms=0, queue_limit=4, timeout_s=0.3), lambda e: None)
    with TestClient(create_app(srv)) as client:
        while client.get("/readyz").status_code != 200:
            time.sleep(0.01)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/images/generations", json={"prompt": "a"})
            time.sleep(0.1)
            second = pool.submit(client.post, "/v1/images/generations", json={"prompt": "b"})
            assert first.result().status_code == 504 and second.result().status_code == 504
        assert srv.scheduler.pending == 0  # the queued request's work was dropped, not run later
        gate.set()
        time.sleep(0.05)
        srv.config.timeout_s = 10
        r = client.post("/v1/images/generations", json={"prompt": "c", "seed": 4, "n": 2})
        assert r.status_code == 200 and [d["seed"] for d in r.json()["data"]] == [4, 5]
        assert not math.isnan(r.json()["macs_ratio"])
