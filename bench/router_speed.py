"""Router speed: prompts/s of inference routing with a cold and a warm prompt-embedding cache.

    python bench/router_speed.py RUN_DIR [--prompts 2000]

Cold: a fresh cache directory, so every prompt goes through the sentence-transformer. Warm: the
same prompts again (embeddings read from the on-disk cache; only the linear predictor and the
cosine to the codes run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402


def main() -> None:
    from aptp.data import build_dataset
    from aptp.router.encoder import PromptEncoder
    from aptp.rundir import RunDir

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    run = RunDir(a.run_dir)
    prompts = build_dataset(run.settings.data, split="validation").captions()[: a.prompts]
    with tempfile.TemporaryDirectory() as cache:
        router = run.router(encoder=PromptEncoder(run.settings.router.prompt_encoder, cache_dir=cache))
        router.route_prompts(prompts[:8])  # load the model outside the timing
        res = {}
        for name in ("cold", "warm"):
            t = time.perf_counter()
            router.route_prompts(prompts)
            res[name] = len(prompts) / (time.perf_counter() - t)
    print(f"{len(prompts)} prompts: cold cache {res['cold']:.0f} prompts/s, warm cache {res['warm']:.0f} prompts/s "
          f"({res['warm'] / res['cold']:.1f}x)")
    write_json(a.json, {"machine": machine(), "prompts": len(prompts), "prompts_per_s": res})


if __name__ == "__main__":
    main()
