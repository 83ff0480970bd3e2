"""Routed generation of a trained mixture: images/s of the mixture vs its teacher vs per-prompt.

    python bench/generate_throughput.py RUN_DIR [--prompts 64] [--batch 8] [--steps 25]

Real generation (the run's pipeline: VAE, text encoder, PNDM, classifier-free guidance) of the
first ``--prompts`` validation captions of the run's dataset, routed by the run's router:

- ``full``: every prompt through the unpruned teacher, in batches of ``--batch``;
- ``mixture``: prompts grouped per expert, each group in batches of ``--batch`` (``aptp generate``);
- ``per-prompt``: each prompt alone with its own expert (batch 1), the dynamic-pruning alternative.

The three run interleaved, ``--reps`` times (median); experts are loaded before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, write_json  # noqa: E402


def main() -> None:
    from aptp.data import build_dataset
    from aptp.generate import ExpertPipeline, Job, plan_jobs
    from aptp.rundir import RunDir
    from aptp.settings import GenerateSettings
    from aptp.train.teacher import load_teacher

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    run = RunDir(a.run_dir)
    s = run.settings
    prompts = build_dataset(s.data, split="validation").captions()[: a.prompts]
    pipe = load_teacher(s.model).pipeline
    pipe.set_progress_bar_config(disable=True)
    ep = ExpertPipeline(run, pipe)
    routed = plan_jobs(run, prompts, 0, None, False)
    full_jobs = [Job(j.index, j.prompt, None, j.seed) for j in routed]
    for k in sorted({j.expert for j in routed}):
        ep.denoiser(k)  # load every expert before timing
    size = s.data.resolution
    batched = GenerateSettings(steps=a.steps, batch_size=a.batch)
    single = GenerateSettings(steps=a.steps, batch_size=1)
    t0 = time.perf_counter()
    med = interleaved({
        "full": lambda: ep.render(full_jobs, batched, size, size),
        "mixture": lambda: ep.render(routed, batched, size, size),
        "per-prompt": lambda: ep.render(routed, single, size, size),
    }, reps=a.reps, warmup=0)
    ratios = {e["expert"]: e["macs_ratio"] for e in run.experts()}
    mean_ratio = sum(ratios[j.expert] for j in routed) / len(routed)
    groups = {k: sum(j.expert == k for j in routed) for k in sorted(ratios)}
    rows = [{"variant": k, "seconds": v, "images_per_s": len(prompts) / v, "throughput_vs_full": med["full"] / v}
            for k, v in med.items()]
    print(f"{len(prompts)} prompts ({s.model.name}, {size}px, {a.steps} steps), batch {a.batch}; "
          f"routed MACs ratio {mean_ratio:.3f}; prompts per expert {groups}")
    print(f"{'variant':<12}{'seconds':>10}{'img/s':>10}{'vs full':>10}")
    for r in rows:
        print(f"{r['variant']:<12}{r['seconds']:>10.2f}{r['images_per_s']:>10.2f}{r['throughput_vs_full']:>10.3f}")
    print(f"mixture vs per-prompt: {med['per-prompt'] / med['mixture']:.2f}x; wall {time.perf_counter() - t0:.0f} s")
    write_json(a.json, {"machine": machine(), "args": vars(a), "mean_macs_ratio": mean_ratio,
                        "prompts_per_expert": groups, "rows": rows})


if __name__ == "__main__":
    main()
