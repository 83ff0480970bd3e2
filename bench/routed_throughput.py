"""Routed generation throughput: the mixture of experts vs the full model vs per-prompt experts.

    python bench/routed_throughput.py                  # CPU fp32, SD-2.1 shape, 64 prompts, 64x64 latent
    python bench/routed_throughput.py --tiny --prompts 16 --reps 1   # dry run

64 mixed prompts are routed (uniformly at random over 8 experts at budget --budget, the
paper-like pattern) and one denoising step with classifier-free guidance (U-Net batch 2B) is
timed for: the full model in batches of B; the mixture, grouped per expert, each group in batches
of B (what `aptp generate` does); and per-prompt execution, each prompt alone with its own
expert (the dynamic-pruning alternative the paper argues against). Reported as images/s per
denoising step and ratios, measured interleaved in one process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, interleaved, machine, sd21_setup, vector_at_budget, write_json  # noqa: E402

from aptp.engine.slicing import slice_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--budget", type=float, default=0.78)
    add_common_args(ap, latent=64, reps=3, batch=8)
    a = ap.parse_args()
    dtype, unet, space, macs = sd21_setup(a)
    # experts spread around the budget like a trained mixture (easy prompts smaller, hard bigger)
    spread = torch.linspace(-0.08, 0.08, a.experts)
    experts, ratios = [], []
    for k in range(a.experts):
        v = vector_at_budget(space, macs, min(1.0, a.budget + float(spread[k])), seed=k + 1)
        experts.append(slice_unet(unet, space, v)[0])
        ratios.append(float(macs.ratio(v)[0]))
    g = torch.Generator().manual_seed(0)
    route = torch.randint(a.experts, (a.prompts,), generator=g)
    cfg = unet.config
    x = torch.randn(a.prompts, cfg.in_channels, a.latent, a.latent, generator=g).to(a.device, dtype)
    c = torch.randn(a.prompts, 77, cfg.cross_attention_dim, generator=g).to(a.device, dtype)

    def step(model, idx):  # one CFG denoising step of the prompts idx, batch 2·len(idx)
        xi, ci = x[idx], c[idx]
        t = torch.full((2 * len(idx),), 500, device=a.device)
        with torch.no_grad():
            model(torch.cat([xi, xi]), t, torch.cat([torch.zeros_like(ci), ci]))

    allidx = torch.arange(a.prompts)

    def full():
        for s in range(0, a.prompts, a.batch):
            step(unet, allidx[s : s + a.batch])

    def mixture():
        for k in range(a.experts):
            idx = allidx[route == k]
            for s in range(0, len(idx), a.batch):
                step(experts[k], idx[s : s + a.batch])

    def per_prompt():
        for i in range(a.prompts):
            step(experts[int(route[i])], allidx[i : i + 1])

    med = interleaved({"full": full, "mixture": mixture, "per-prompt": per_prompt}, reps=a.reps)
    mean_ratio = sum(ratios[int(k)] for k in route) / a.prompts
    rows = [{"variant": k, "seconds": v, "images_per_s": a.prompts / v, "throughput_vs_full": med["full"] / v}
            for k, v in med.items()]
    print(f"{a.prompts} prompts, {a.experts} experts, mean routed MACs ratio {mean_ratio:.3f}, batch {a.batch}")
    print(f"{'variant':<12}{'s/step':>10}{'img/s':>10}{'vs full':>10}")
    for r in rows:
        print(f"{r['variant']:<12}{r['seconds']:>10.3f}{r['images_per_s']:>10.2f}{r['throughput_vs_full']:>10.3f}")
    write_json(a.json, {"machine": machine(), "args": vars(a), "mean_macs_ratio": mean_ratio,
                        "expert_macs_ratios": ratios, "rows": rows})


if __name__ == "__main__":
    main()
