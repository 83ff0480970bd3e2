"""Shared pieces of the benchmarks: models, architectures at a MACs budget, interleaved timing."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from aptp.engine.macs import MacsModel
from aptp.engine.space import ArchSpace

# Paper-like pruning pattern (App. E.4.5): attention heads and ResBlock groups are pruned more
# than FFN channels. Relative "pressure" per kind; a global scale is searched to hit the budget.
PATTERN = {"resnet_channels": 1.0, "self_attn_heads": 1.3, "cross_attn_heads": 1.3, "ffn_channels": 0.6,
           "depth": 0.0}


def sd21_unet(device: str = "cpu", dtype=torch.float32, tiny: bool = False):
    """SD-2.1-shaped U-Net with random weights (timing only); ``tiny`` for dry runs."""
    from diffusers import UNet2DConditionModel

    from aptp.models.registry import resolve_model, unet_config

    cfg = unet_config(resolve_model("sd2.1"))
    if tiny:
        cfg.update(block_out_channels=[32, 64, 64, 64], attention_head_dim=[2, 2, 4, 4], norm_num_groups=8,
                   cross_attention_dim=32)
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(cfg).to(device, dtype).eval()


def vector_at_budget(space: ArchSpace, macs: MacsModel, budget: float, drop_depth: int = 0,
                     pattern: dict[str, float] = PATTERN, seed: int = 0) -> torch.Tensor:
    """A hard vector with the paper-like pattern whose MACs ratio is just under ``budget``.

    Units are dropped in an order mixing random scores with the kind's pressure; ``drop_depth``
    depth units are removed first (the variant with dropped blocks).
    """
    g = torch.Generator().manual_seed(seed)
    v = torch.ones(space.size, dtype=torch.float64)
    depth = [s.offset for s in space.segments if s.kind == "depth"]
    for off in depth[:drop_depth]:
        v[off] = 0
    score = torch.rand(space.size, generator=g, dtype=torch.float64)
    for s in space.segments:
        w = pattern.get(s.kind, 1.0)
        score[s.offset : s.stop] = float("inf") if w == 0 else score[s.offset : s.stop] / w
        if s.kind != "depth":  # keep one unit per layer
            score[s.offset + int(torch.randint(s.size, (1,), generator=g))] = float("inf")
    for i in torch.argsort(score).tolist():
        if float(macs.ratio(v)[0]) <= budget or not torch.isfinite(score[i]):
            break
        v[i] = 0
    return v.float()


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_common_args(ap: argparse.ArgumentParser, *, latent: int, reps: int, batch: int) -> None:
    """The options every timing script takes: shape, repetitions, device, precision, output."""
    ap.add_argument("--latent", type=int, default=latent, help="latent height = width")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--reps", type=int, default=reps, help="timed repetitions (median reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--tiny", action="store_true", help="tiny config: a dry run of the script")
    ap.add_argument("--json", default=None, help="write the results with the machine description here")


def sd21_setup(a: argparse.Namespace):
    """(dtype, unet, space, macs) of the SD-2.1-shaped U-Net for the parsed common options."""
    from aptp.engine.macs import build_macs_model
    from aptp.engine.space import build_space

    dtype = DTYPES[a.dtype]
    unet = sd21_unet(a.device, dtype, tiny=a.tiny)
    space = build_space(unet)
    return dtype, unet, space, build_macs_model(unet, space, a.latent)


def interleaved(fns: dict[str, Callable[[], None]], reps: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run round-robin so drifts hit every variant alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            f()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2))
