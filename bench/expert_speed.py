"""Expert latency vs MACs: the full SD-2.1-shaped U-Net vs sliced experts at several budgets.

    python bench/expert_speed.py                       # CPU, fp32, batch 1, 64x64 latent
    python bench/expert_speed.py --device cuda --dtype fp16 --latent 96
    python bench/expert_speed.py --tiny --reps 2       # dry run on a tiny config

Full and experts are timed interleaved in one process (medians of --reps); the table puts each
expert's latency ratio next to its MACs ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, sd21_unet, vector_at_budget, write_json  # noqa: E402

from aptp.engine.macs import build_macs_model  # noqa: E402
from aptp.engine.slicing import slice_unet  # noqa: E402
from aptp.engine.space import build_space  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.5,0.66,0.78,0.85")
    ap.add_argument("--drop-depth", type=int, default=4, help="depth units dropped in the depth variant")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    unet = sd21_unet(a.device, dtype, tiny=a.tiny)
    space = build_space(unet)
    macs = build_macs_model(unet, space, a.latent)
    cfg = unet.config
    x = torch.randn(a.batch, cfg.in_channels, a.latent, a.latent, device=a.device, dtype=dtype)
    t = torch.full((a.batch,), 500, device=a.device)
    c = torch.randn(a.batch, 77, cfg.cross_attention_dim, device=a.device, dtype=dtype)
    models = {"full": unet}
    ratios = {"full": 1.0}
    for b in [float(v) for v in a.budgets.split(",")]:
        for depth in (0, a.drop_depth):
            v = vector_at_budget(space, macs, b, drop_depth=depth)
            name = f"{b:.2f}" + (f"-depth{depth}" if depth else "")
            models[name], _ = slice_unet(unet, space, v)
            ratios[name] = float(macs.ratio(v)[0])

    def runner(m):
        def f():
            with torch.no_grad():
                m(x, t, c)
        return f

    med = interleaved({k: runner(m) for k, m in models.items()}, reps=a.reps)
    rows = [{"model": k, "macs_ratio": ratios[k], "latency_s": med[k], "latency_ratio": med[k] / med["full"]}
            for k in models]
    print(f"{'model':<14}{'MACs ratio':>12}{'latency (s)':>14}{'latency ratio':>15}{'gap':>8}")
    for r in rows:
        print(f"{r['model']:<14}{r['macs_ratio']:>12.3f}{r['latency_s']:>14.4f}{r['latency_ratio']:>15.3f}"
              f"{r['latency_ratio'] - r['macs_ratio']:>+8.3f}")
    write_json(a.json, {"machine": machine(), "args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
