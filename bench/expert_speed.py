"""Expert latency vs MACs: the full SD-2.1-shaped U-Net vs sliced experts at several budgets.

    python bench/expert_speed.py                       # CPU, fp32, batch 1, 64x64 latent
    python bench/expert_speed.py --device cuda --dtype fp16 --latent 96
    python bench/expert_speed.py --tiny --reps 2       # dry run on a tiny config

Per budget, the full model and that budget's experts (the paper-like pattern, the variant with
dropped depth units, and the hardware-aligned variant of each ``--align`` multiple) are timed
interleaved in one process (medians of ``--reps``); the table puts each expert's latency ratio
next to its MACs ratio. One budget's models are in memory at a time (SD 2.1 in fp32 is 3.5 GB a
copy), so the script fits a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, interleaved, machine, sd21_setup, vector_at_budget, write_json  # noqa: E402

from aptp.engine.align import align_vector, aligned_fraction  # noqa: E402
from aptp.engine.slicing import slice_unet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.5,0.66,0.78,0.85")
    ap.add_argument("--drop-depth", type=int, default=4, help="depth units dropped in the depth variant")
    ap.add_argument("--align", default="8", help="comma-separated channel multiples for aligned variants ('' = none)")
    add_common_args(ap, latent=64, reps=3, batch=1)
    a = ap.parse_args()
    dtype, unet, space, macs = sd21_setup(a)
    cfg = unet.config
    x = torch.randn(a.batch, cfg.in_channels, a.latent, a.latent, device=a.device, dtype=dtype)
    t = torch.full((a.batch,), 500, device=a.device)
    c = torch.randn(a.batch, 77, cfg.cross_attention_dim, device=a.device, dtype=dtype)
    aligns = [int(m) for m in a.align.split(",") if m.strip()]

    def runner(m):
        def f():
            with torch.no_grad():
                m(x, t, c)
        return f

    rows = []
    for b in [float(v) for v in a.budgets.split(",")]:
        vectors = {}
        for depth in (0, a.drop_depth):
            v = vector_at_budget(space, macs, b, drop_depth=depth)
            vectors[f"{b:.2f}" + (f"-depth{depth}" if depth else "")] = v
            for m in aligns:
                vectors[f"{b:.2f}" + (f"-depth{depth}" if depth else "") + f"-align{m}"] = align_vector(
                    space, v, macs, m)
        models = {"full": unet}
        for name, v in vectors.items():
            models[name], _ = slice_unet(unet, space, v)
        med = interleaved({k: runner(m) for k, m in models.items()}, reps=a.reps)
        for name in models:
            v = vectors.get(name)
            rows.append({
                "budget": b, "model": name, "macs_ratio": 1.0 if v is None else float(macs.ratio(v)[0]),
                "latency_s": med[name], "latency_ratio": med[name] / med["full"],
                "aligned8": 1.0 if v is None else aligned_fraction(space, v, 8),
            })
        del models
        gc.collect()
    print(f"{'model':<22}{'MACs ratio':>11}{'latency (s)':>13}{'latency ratio':>15}{'gap':>8}{'aligned/8':>11}")
    for r in rows:
        print(f"{r['model']:<22}{r['macs_ratio']:>11.3f}{r['latency_s']:>13.4f}{r['latency_ratio']:>15.3f}"
              f"{r['latency_ratio'] - r['macs_ratio']:>+8.3f}{r['aligned8']:>11.2f}")
    write_json(a.json, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
