"""Cost of pruning: one prune step vs one plain denoising training step of the same U-Net.

    python bench/prune_cost.py                 # CPU fp32, SD-2.1 shape, batch 2, 32x32 latent
    python bench/prune_cost.py --tiny          # dry run

A prune step = the gated student forward + backward to the gate vectors (the U-Net's weights are
frozen) + the teacher forward with gates off (the same module: no second copy of the weights). A
plain step = forward + backward to all U-Net weights + an AdamW update. Each variant runs in its
own subprocess so its peak memory (max RSS on CPU, max allocated on CUDA) is its own; times are
medians. Reports time ratio and peak-memory ratio (prune / plain).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DTYPES, add_common_args, machine, sd21_unet, write_json  # noqa: E402


def child(a) -> None:
    from aptp.engine.gates import UNetGates
    from aptp.engine.space import build_space
    from aptp.train.distill import capture_blocks, distill_loss

    dtype = DTYPES[a.dtype]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # imports only (CPU high-water mark)
    unet = sd21_unet(a.device, dtype, tiny=a.tiny)
    cfg = unet.config
    x = torch.randn(a.batch, cfg.in_channels, a.latent, a.latent, device=a.device, dtype=dtype)
    t = torch.full((a.batch,), 500, device=a.device)
    c = torch.randn(a.batch, 77, cfg.cross_attention_dim, device=a.device, dtype=dtype)
    if a.variant == "prune":
        unet.requires_grad_(False)
        space = build_space(unet)
        gates = UNetGates(unet, space)
        v = torch.full((a.batch, space.size), 0.8, device=a.device, requires_grad=True)

        def step():
            with gates.apply(v), capture_blocks(unet) as sb:
                out = unet(x, t, c).sample
            with torch.no_grad(), gates.off(), capture_blocks(unet) as tb:
                ref = unet(x, t, c).sample
            lo, lb = distill_loss(out, ref, sb, tb)
            (out.float().pow(2).mean() + (lo + lb).mean()).backward()
            v.grad = None
    else:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)

        def step():
            out = unet(x, t, c).sample
            out.float().pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(a.reps):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        s = time.perf_counter()
        step()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - s)
    peak = (torch.cuda.max_memory_allocated() if a.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    print(json.dumps({"seconds": statistics.median(times), "peak_bytes": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, latent=32, reps=3, batch=2)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.variant:
        return child(a)
    res = {}
    for variant in ("plain", "prune"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(a).items() if k not in ("variant", "json", "tiny") and v is not None]
        cmd += ["--tiny"] if a.tiny else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        res[variant] = json.loads(out)
    time_ratio = res["prune"]["seconds"] / res["plain"]["seconds"]
    mem_ratio = res["prune"]["peak_bytes"] / res["plain"]["peak_bytes"]
    for k, r in res.items():
        print(f"{k:<6} {r['seconds']:.3f} s/step  peak {r['peak_bytes'] / 2**30:.2f} GiB")
    print(f"prune/plain: time ratio {time_ratio:.2f}, peak-memory ratio {mem_ratio:.2f}")
    write_json(a.json, {"machine": machine(), "args": vars(a), "variants": res, "time_ratio": time_ratio,
                        "memory_ratio": mem_ratio})


if __name__ == "__main__":
    main()
