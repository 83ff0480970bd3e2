"""Paired comparison of models over their prune seeds, from stored per-image features.

    python bench/seed_pooled.py aptp-cd-s0,aptp-cd-s1,aptp-cd-s2 uni-cd-s0,uni-cd-s1,uni-cd-s2 ... \
        [--stored bench/study-embeddings] [--guidance 3] [--resamples 1000] [--sets 100]

Each argument is one model: a comma list of the stems of its seeds' `aptp eval --save-embeddings`
files (``STORED/STEM-gG.safetensors``); the first is the reference. Two tables come out:

* **over seeds**: a model's value of each metric is the mean of its seeds' values (CLIP: the mean
  over seeds and prompts; FD and CMMD: each seed's images against the real images, then the
  mean of those). The bootstrap draws prompts, each with every seed's image of it (a cluster
  bootstrap; the same draws for every model), so the paired difference from the reference
  averages out what one seed pair alone would show, and its interval is over the prompts: the
  seeds are held fixed, and their spread is the ``± std`` column (sample std of the per-seed
  values), which the interval does not include;
* **every seed pair**: each seed of a model against each seed of the reference, as
  ``aptp eval --reference`` would pair them, with the count of pairs whose interval excludes 0.

The real side is what ``aptp eval`` scores against (the shapes validation split's statistics, from
its cache), so a one-seed model's values equal the eval's.

Nothing is generated: it reads what `aptp eval` saved. FD and CMMD intervals are centred on the
measured value as in ``aptp.metrics.bootstrap``. FD and CMMD are averaged per seed rather than
computed on all seeds' images at once: a pooled set of 3 × 500 images has a smaller estimator bias
than 500 images (so a three-seed model would be favoured against a one-seed one), and the seeds'
images of one prompt share its sampling noise, so they are near-duplicates that the unbiased CMMD
does not discount. The mean of per-seed values has neither problem and is read like the eval's.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from aptp.metrics.bootstrap import (bootstrap_distribution, cmmd_statistic, fd_statistic, mean_statistic,
                                    paired_summary, resample_indices, summary)
from aptp.metrics.embeddings import load_embeddings
from aptp.metrics.fid import GaussianStats

METRICS = (("clip", 1, "CLIP ↑"), ("fid", 4, "FD ↓"), ("cmmd", 3, "CMMD ↓"))


class Model:
    """One model's seeds: per-image CLIP scores ``(S, N)`` and features ``(S, N, d)``."""

    def __init__(self, stems: list[str], stored: Path, guidance: str, captions: list[str] | None):
        self.stems = stems
        files = [load_embeddings(stored / f"{s}-g{guidance}.safetensors") for s in stems]
        self.captions = captions or files[0].captions
        n = len(self.captions)
        for f in files:
            f.select(self.captions)  # one line if a seed was scored on other captions
        self.clip = torch.stack([f.tensors["clip"][:n] for f in files]).to(torch.float64)
        self.fid = torch.stack([f.tensors["fid_image"][:n] for f in files]).to(torch.float64)
        self.emb = torch.stack([f.tensors["clip_image"][:n] for f in files]).to(torch.float64)
        self.macs = [f.info.get("macs_ratio") for f in files]
        ids = {f.feature_ids.get("clip_image") for f in files} | {f.feature_ids.get("fid_image") or
                                                                 f.feature_ids.get("clip_image") for f in files}
        if len(ids) != 1:
            raise SystemExit(f"{stems}: scored with different feature networks ({sorted(map(str, ids))})")
        self.feature_id = ids.pop()

    def statistics(self, metric: str, real: GaussianStats, real_emb: torch.Tensor) -> list:
        """One bootstrap statistic per seed (prompt indices -> the metric on those prompts' images),
        built as ``aptp eval`` builds its own."""
        if metric == "clip":
            return [mean_statistic(v) for v in self.clip]
        if metric == "fid":
            return [fd_statistic(real, f) for f in self.fid]
        return [cmmd_statistic(real_emb, f) for f in self.emb]


def real_side(n: int, model: Model) -> tuple[GaussianStats, torch.Tensor]:
    """The real statistics ``aptp eval`` scores against (the shapes validation split's first ``n``
    images, from its cache after the first eval), checked to be the features the files hold."""
    from aptp.evaluate import feature_networks, reference
    from aptp.metrics import real_statistics
    from aptp.metrics.fid import StatsCache
    from aptp.settings import resolve_settings

    settings = resolve_settings(overrides=[f"eval.limit={n}"], env={})
    captions, load_real, key = reference(settings, n)
    if captions != model.captions:
        raise SystemExit(f"{model.stems[0]}: not scored on the first {n} captions of the shapes validation split")
    clip, fid = feature_networks(settings)
    if fid is not None and fid is not clip:
        raise SystemExit("the shapes eval scores FD on the CLIP features; these settings do not")
    if model.feature_id != clip.feature_id:
        raise SystemExit(f"{model.stems[0]}: features of {model.feature_id}, the eval uses {clip.feature_id}")
    stats = real_statistics(f"{key}@{settings.eval.resolution}px", clip, load_real, StatsCache(),
                            keep_features=True)
    return stats, stats.features.to(torch.float64)


def fmt_delta(p: dict, digits: int) -> str:
    lo, hi = p["delta_ci95"]
    mark = "" if lo <= 0 <= hi else " *"
    return f"{p['delta']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="STEM,STEM,... per model (its seeds); the first is the reference")
    ap.add_argument("--stored", type=Path, default=Path("bench/study-embeddings"))
    ap.add_argument("--guidance", default="3")
    ap.add_argument("--resamples", type=int, default=1000, help="bootstrap draws for CLIP")
    ap.add_argument("--sets", type=int, default=100, help="of those, how many FD and CMMD use (the first)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws")
    args = ap.parse_args()

    first = Model(args.models[0].split(","), args.stored, args.guidance, None)
    models = [first] + [Model(m.split(","), args.stored, args.guidance, first.captions) for m in args.models[1:]]
    n = len(first.captions)
    real, real_emb = real_side(n, models[0])
    draws = resample_indices(n, args.resamples, args.seed)
    everything = torch.arange(n)

    def measure(model: Model) -> list[dict[str, tuple[float, torch.Tensor]]]:
        """Per seed, per metric: the value and its bootstrap distribution on the shared draws."""
        out = [{} for _ in model.stems]
        for metric, _, _ in METRICS:
            rows = draws if metric == "clip" else draws[: args.sets]
            for k, stat in enumerate(model.statistics(metric, real, real_emb)):
                out[k][metric] = (stat(everything), bootstrap_distribution(stat, rows))
        return out

    def over_seeds(seeds: list[dict]) -> dict[str, tuple[float, torch.Tensor]]:
        """The mean over seeds of each value and of each draw's statistic (a cluster bootstrap)."""
        return {metric: (statistics.fmean(m[metric][0] for m in seeds),
                         torch.stack([m[metric][1] for m in seeds]).mean(0)) for metric, _, _ in METRICS}

    ref = models[0]
    print(f"Guidance {args.guidance}, {n} prompts; reference {','.join(ref.stems)}; [lo, hi] = 95% bootstrap "
          f"interval over prompts ({args.resamples} draws, the first {args.sets} for FD and CMMD); "
          "* = the interval excludes 0.\n")
    per_seed = [measure(m) for m in models]
    pooled = [over_seeds(seeds) for seeds in per_seed]
    print("Over seeds (each metric the mean of the per-seed values; ± = their sample std):\n")
    print("| model | seeds | MACs | " + " | ".join(f"{h} | Δ {h.split()[0]}" for _, _, h in METRICS) + " |")
    print("|---|---:|---:|" + "---:|---:|" * len(METRICS))
    for m, seeds, meas in zip(models, per_seed, pooled):
        cells = []
        for metric, digits, _ in METRICS:
            value, dist = meas[metric]
            spread = f" ± {statistics.stdev(x[metric][0] for x in seeds):.{digits}f}" if len(seeds) > 1 else ""
            s = summary(value, dist, centre=metric != "clip")
            lo, hi = s["ci95"]
            cells.append(f"{value:.{digits}f}{spread} [{lo:.{digits}f}, {hi:.{digits}f}]")
            if m is ref:
                cells.append("ref")
            else:
                rv, rd = pooled[0][metric]
                cells.append(fmt_delta(paired_summary(value, rv, dist, rd, centre=metric != "clip"), digits))
        macs = [x for x in m.macs if x is not None]
        mac = f"{statistics.mean(macs):.3f}" if macs else "–"
        print(f"| {','.join(m.stems)} | {len(m.stems)} | {mac} | " + " | ".join(cells) + " |")

    print("\nEvery seed pair (Δ = model seed − reference seed):\n")
    print("| model seed | reference seed | Δ CLIP | Δ FD | Δ CMMD |")
    print("|---|---|---:|---:|---:|")
    for m, seeds in zip(models[1:], per_seed[1:]):
        excl = {metric: 0 for metric, _, _ in METRICS}
        total = 0
        for a, ma in enumerate(seeds):
            for b, mb in enumerate(per_seed[0]):
                cells = []
                for metric, digits, _ in METRICS:
                    p = paired_summary(ma[metric][0], mb[metric][0], ma[metric][1], mb[metric][1],
                                       centre=metric != "clip")
                    excl[metric] += not (p["delta_ci95"][0] <= 0 <= p["delta_ci95"][1])
                    cells.append(fmt_delta(p, digits))
                total += 1
                print(f"| {m.stems[a]} | {ref.stems[b]} | " + " | ".join(cells) + " |")
        print(f"| {','.join(m.stems)} | intervals excluding 0 | "
              + " | ".join(f"{excl[metric]} of {total}" for metric, _, _ in METRICS) + " |")


if __name__ == "__main__":
    main()
