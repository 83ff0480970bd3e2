"""The Markdown tables of a `bench/fidelity_study.sh` study, from its `eval-g*/results.json`.

    python bench/study_table.py runs/study [--guidance 3] [--rows aptp-s0,uni-s0,...]

Per model: MACs ratio, FD / CLIP / CMMD with their 95% bootstrap intervals and the paired
difference from the eval's reference (``--reference`` of the study's eval, APTP seed 0) with its
interval, the CLIP score per difficulty tier and the paired CLIP difference per tier (bootstrap
over the tier's prompts, same draws for every model). Rows with several prune seeds (``NAME-sK``)
get a second table: mean ± sample std over the seeds. Nothing here is measured anew: it reads what
`aptp eval` wrote. The tiers come from STUDY/real/metadata.jsonl, or, without it (a study scored
from `bench/study-embeddings/` alone), from the shapes world's validation split.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from aptp.metrics.bootstrap import paired_summary, resample_indices

LABELS = {
    "teacher": "teacher (toy, unpruned)",
    "wn": "weight-norm (L1, Li et al. 2017)",
    "taylor": "Taylor importance (Diff-Pruning-style)",
    "bk-sdm": "BK-SDM-style block removal + weight-norm widths",
    "uni-paper": "Uni-Arch, the paper's (codes trained directly)",
    "uni": "Uni-Arch, warm-started from the router",
    "aptp": "APTP (optimal transport + distillation)",
    "noot": "APTP without optimal transport",
    "nodistill": "APTP without distillation",
    "noot-nodistill": "APTP without optimal transport or distillation",
    "aptp-centred": "APTP, router.similarity=centred",
    "aptp-snr": "APTP, prune.snr_gamma=5",
    "aptp-per-expert": "APTP, prune.resource_per=expert",
    "aptp-cd": "APTP, finetune.caption_dropout=0.1",
    "uni-cd": "Uni-Arch (warm-started), finetune.caption_dropout=0.1",
    "wn-cd": "weight-norm, finetune.caption_dropout=0.1",
    "taylor-cd": "Taylor importance, finetune.caption_dropout=0.1",
    "bk-sdm-cd": "BK-SDM-style, finetune.caption_dropout=0.1",
    "uni-paper-cd": "Uni-Arch (the paper's), finetune.caption_dropout=0.1",
    "aptp-split": "APTP, finetune.steps_mode=split (one static model's fine-tuning compute)",
    "aptp-big": "APTP, fine-tuned on the larger train split (fidelity_study.sh BIG, default 125,000)",
    "uni-big": "Uni-Arch (warm-started), fine-tuned on the larger train split (BIG)",
    "uni-medium": "Uni-Arch (warm-started), fine-tuned on the medium tier's training prompts alone",
    "real": "real validation images",
}
TIERS = ("easy", "medium", "hard", "hardest")


def name_of(target: str, guidance: str) -> str:
    name = Path(target.rstrip("/")).name.removesuffix(".safetensors")  # images, or their stored features
    return name[: -len(f"-g{guidance}")] if name.endswith(f"-g{guidance}") else name


def base_of(name: str) -> tuple[str, str | None]:
    head, sep, seed = name.rpartition("-s")
    return (head, seed) if sep and seed.isdigit() else (name, None)


def label(name: str) -> str:
    base, seed = base_of(name)
    text = LABELS.get(base, base)
    return f"{text}, seed {seed}" if seed is not None else text


def interval(b: dict | None, digits: int) -> str:
    if b is None:
        return "–"
    lo, hi = b["ci95"]
    return f"{b['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def delta(b: dict | None, digits: int, is_ref: bool) -> str:
    if is_ref:
        return "ref"
    if b is None or "delta" not in b:
        return "–"
    lo, hi = b["delta_ci95"]
    mark = "" if lo <= 0 <= hi else " *"  # the interval excludes 0
    return f"{b['delta']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def tier_deltas(rows: list[dict], ref: dict, tiers: list[str], resamples: int, seed: int) -> dict[str, dict]:
    """Per row and tier, the paired CLIP difference from ``ref`` with its 95% interval."""
    out: dict[str, dict] = {}
    ref_clip = torch.tensor(ref["per_image"]["clip"], dtype=torch.float64)
    for tier in TIERS:
        idx = torch.tensor([i for i, t in enumerate(tiers) if t == tier])
        if len(idx) == 0:
            continue
        draws = idx[resample_indices(len(idx), resamples, seed)]
        ref_dist = ref_clip[draws].mean(1)
        for r in rows:
            clip = torch.tensor(r["per_image"]["clip"], dtype=torch.float64)
            out.setdefault(r["target"], {})[tier] = paired_summary(
                float(clip[idx].mean()), float(ref_clip[idx].mean()), clip[draws].mean(1), ref_dist)
    return out


def validation_tiers(metadata: Path, n: int) -> list[str]:
    """The tier of each of the first ``n`` validation prompts: from the study's exported real images
    (``metadata.jsonl``) when they are there, else from the shapes world itself (a sample's tier is
    a pure function of its split and index, and the study's real images are validation 0..n-1)."""
    if metadata.is_file():
        return [json.loads(line)["tier"] for line in metadata.read_text().splitlines() if line.strip()][:n]
    from aptp.evaluate import tiers_of  # what `aptp eval` itself uses, with the default (shapes) settings
    from aptp.settings import Settings

    return tiers_of(Settings(), n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("--guidance", default="3")
    ap.add_argument("--rows", help="comma list of row names to show (default: all, in the eval's order)")
    ap.add_argument("--eval", type=Path, help="results.json to read (default STUDY/eval-gG/results.json)")
    args = ap.parse_args()
    results = json.loads((args.eval or args.study / f"eval-g{args.guidance}" / "results.json").read_text())
    tiers = validation_tiers(args.study / "real" / "metadata.jsonl", results[0]["n_images"])
    boot = results[0]["bootstrap"]
    ref = next(r for r in results if r["target"] == boot["reference"])
    ref_name = name_of(ref["target"], args.guidance)
    by_name = {name_of(r["target"], args.guidance): r for r in results}
    names = args.rows.split(",") if args.rows else list(by_name)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"not in the eval: {', '.join(missing)} (have: {', '.join(by_name)})")
    rows = [by_name[n] for n in names]
    td = tier_deltas([r for r in rows if "per_image" in r and r["per_image"].get("clip")], ref, tiers,
                     boot["resamples"], boot["seed"])
    print(f"Guidance {args.guidance}, {results[0]['n_images']} prompts; [lo, hi] = 95% bootstrap interval "
          f"({boot['resamples']} resamples over prompts); Δ = paired difference from {ref_name} "
          "(* = its interval excludes 0).\n")
    print("| model | MACs | FD ↓ | Δ FD | CLIP ↑ | Δ CLIP | CMMD ↓ | Δ CMMD | CLIP easy / medium / hard / hardest "
          "| Δ CLIP medium | Δ CLIP hardest |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in zip(names, rows):
        m = r["bootstrap"]["metrics"]
        is_ref = r["target"] == ref["target"]
        macs = "–" if r.get("macs_ratio") is None else f"{r['macs_ratio']:.3f}"
        per_tier = " / ".join(f"{r.get('clip_' + t, float('nan')):.1f}" for t in TIERS)
        tdr = td.get(r["target"], {})
        tier_cells = [delta(tdr.get(t), 1, is_ref) for t in ("medium", "hardest")]
        print(f"| {label(n)} | {macs} | {interval(m.get('fid'), 4)} | {delta(m.get('fid'), 4, is_ref)} "
              f"| {interval(m.get('clip'), 1)} | {delta(m.get('clip'), 1, is_ref)} | {interval(m.get('cmmd'), 3)} "
              f"| {delta(m.get('cmmd'), 3, is_ref)} | {per_tier} | {tier_cells[0]} | {tier_cells[1]} |")
    seeded: dict[str, list[dict]] = {}
    for n, r in zip(names, rows):
        base, seed = base_of(n)
        if seed is not None:
            seeded.setdefault(base, []).append(r)
    seeded = {b: rs for b, rs in seeded.items() if len(rs) > 1}
    if seeded:
        print("\nOver prune seeds (mean ± sample std; each seed: prune + materialize + finetune):\n")
        print("| model | seeds | MACs | FD ↓ | CLIP ↑ | CMMD ↓ | CLIP medium |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for b, rs in seeded.items():
            def ms(key: str, digits: int) -> str:
                v = [r[key] for r in rs]
                return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"
            print(f"| {LABELS.get(b, b)} | {len(rs)} | {ms('macs_ratio', 3)} | {ms('fid', 4)} | {ms('clip', 1)} "
                  f"| {ms('cmmd', 3)} | {ms('clip_medium', 1)} |")


if __name__ == "__main__":
    main()
