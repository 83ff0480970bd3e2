"""``aptp eval``: generate for the evaluation captions and score, several models side by side.

A target is a run directory (its routed mixture of experts), a model (alias, diffusers folder or
hub id: the unpruned pipeline), a folder of generated images with ``manifest.jsonl`` (from
``aptp generate``), or a target's per-image features saved by an earlier ``aptp eval
--save-embeddings`` (``.safetensors``: scored again without its images). Protocol as the paper (App. E.3): the data set's evaluation captions, fixed
seeds (prompt *i* gets ``generate.seed + i``), images generated at the model's resolution and
resized to ``eval.resolution`` with PIL bicubic; real reference statistics cached per data set
and feature network. MACs per image and measured seconds per image are reported beside quality.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from aptp.errors import AptpUserError
from aptp.settings import Settings

logger = logging.getLogger(__name__)


WEIGHTS = ("auto", "initial", "finetuned")


@dataclass
class Target:
    name: str
    kind: str  # run | model | images | embeddings (a file of `aptp eval --save-embeddings`)
    path: str
    weights: str = "auto"  # runs: auto (fine-tuned if present), initial (as materialized) or finetuned


# metrics scored per image (bootstrapped as means); the others (FD, CMMD) are set statistics,
# recomputed per draw and centred on their value (aptp.metrics.bootstrap)
PER_PROMPT = ("clip", "pickscore")


def _split_weights(target: str) -> tuple[Path, str | None]:
    """(path, weights) of ``RUN@initial|finetuned``; (path, None) for anything else, including
    an existing folder whose name merely ends so."""
    base, sep, weights = target.rpartition("@")
    if sep and weights in WEIGHTS and not Path(target).expanduser().exists():
        return Path(base).expanduser(), weights
    return Path(target).expanduser(), None


def _is_run(p: Path) -> bool:
    return p.is_dir() and (p / "settings.yaml").is_file()


def run_path(target: str) -> Path | None:
    """The run directory a target names (``RUN`` or ``RUN@initial|finetuned``), else None."""
    p, _ = _split_weights(target)
    return p if _is_run(p) else None


def classify(target: str) -> Target:
    """What a command-line target is. ``RUN_DIR@initial`` / ``RUN_DIR@finetuned`` pick a run's
    expert weights (before or after fine-tuning), so both can stand in one table."""
    p, weights = _split_weights(target)
    if weights is not None and not _is_run(p):
        raise AptpUserError(f"{target}: {p} is not a run directory (settings.yaml missing)")
    if _is_run(p):
        return Target(target, "run", str(p), weights or "auto")
    if p.is_dir() and ((p / "manifest.jsonl").is_file() or (p / "metadata.jsonl").is_file()):
        return Target(target, "images", str(p))
    from aptp.metrics.embeddings import is_embeddings_file

    if is_embeddings_file(p):
        return Target(target, "embeddings", str(p))
    from aptp.models.registry import resolve_model

    resolve_model(target)  # raises one line if it is none of them
    return Target(target, "model", target)


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def tiers_of(settings: Settings, n: int) -> list[str] | None:
    """Difficulty tier of each evaluation sample (the shapes world only)."""
    if settings.data.name != "shapes":
        return None
    from aptp.data.shapes_world import ShapesWorld

    world = ShapesWorld(settings.seed)
    return [world.tier(settings.eval.split, i) for i in range(n)]


def reference(settings: Settings, limit: int | None) -> tuple[list[str], Callable[[], list[Image.Image]], str]:
    """(captions, a loader of the matching real images, a cache key naming this exact real set)."""
    from aptp.data import build_dataset

    ds = build_dataset(settings.data, split=settings.eval.split, seed=settings.seed)
    n = len(ds) if limit is None else min(limit, len(ds))
    captions = ds.captions()[:n]

    def load() -> list[Image.Image]:
        # resized as they are read, so a 30k-image reference never sits in memory at full size
        from aptp.metrics import resize_for_eval

        return [resize_for_eval(_to_pil(ds[i]["pixel_values"]), settings.eval.resolution) for i in range(n)]

    key = f"{settings.data.name}-{settings.eval.split}-n{n}-r{settings.data.resolution}-seed{settings.seed}"
    return captions, load, key.replace("/", "_")


def feature_networks(settings: Settings):
    """(CLIP features, FID features) named by the eval settings ("auto" picks by data set)."""
    from aptp.metrics import ClipFeatures
    from aptp.metrics.features import load_fid_features

    e = settings.eval
    shapes = settings.data.name == "shapes"
    name = e.clip_model
    if name == "auto":
        name = "domain-clip" if shapes else "ViT-B-32"
    if name == "domain-clip" or name.startswith("domain-clip:"):
        clip = ClipFeatures.domain_clip(name.partition(":")[2] or None)
    else:
        clip = ClipFeatures.from_open_clip(name, e.clip_pretrained)
    fid_spec = e.fid_features if e.fid_features is not None else ("clip" if shapes and name.startswith("domain-clip") else None)
    fid = load_fid_features(fid_spec, clip=clip)
    return clip, fid


def _generate_target(t: Target, settings: Settings, captions: list[str],
                     save_dir: Path | None) -> tuple[list[Image.Image], dict[str, Any]]:
    """(images resized for the metrics, {mean MACs ratio over the prompts, seconds per image,
    guidance scale}).

    Each finished batch is resized to ``eval.resolution`` at once (and saved at full size to
    ``save_dir``), so memory holds only the small copies however many captions there are.
    """
    from aptp.generate import ExpertPipeline, generation_size, plan_jobs
    from aptp.metrics import resize_for_eval
    from aptp.rundir import RunDir
    from aptp.train.teacher import load_teacher

    g = settings.generate
    if t.kind == "run":
        run = RunDir(t.path)
        s = run.settings
        pipe = load_teacher(s.model).pipeline
        jobs = plan_jobs(run, captions, g.seed, None, False)
        ratios = {e["expert"]: e["macs_ratio"] for e in run.experts()}
        macs = sum(ratios[j.expert] for j in jobs) / len(jobs)
        # the run's generation size (its deployment resolution), not its training resolution
        h, w = generation_size(s, g)
        ep = ExpertPipeline(run, pipe, weights=t.weights)
        for k in sorted({j.expert for j in jobs}):
            run.expert_dir(k, t.weights)  # one clear line before any generation if weights are missing
    else:
        from aptp.models.registry import default_resolution, resolve_model
        from aptp.settings import ModelSettings

        pipe = load_teacher(ModelSettings(name=t.path)).pipeline
        jobs = plan_jobs(None, captions, g.seed, None, True)
        macs = 1.0
        res = default_resolution(resolve_model(t.path))
        h, w = g.height or res, g.width or res
        ep = ExpertPipeline(None, pipe, model=t.path)
    small: dict[int, Image.Image] = {}
    saving = 0.0

    def keep(batch, imgs) -> None:
        nonlocal saving
        t0 = time.perf_counter()
        for j, img in zip(batch, imgs):
            if save_dir is not None:
                img.save(save_dir / f"{j.index:05d}.png")
            small[j.index] = resize_for_eval(img, settings.eval.resolution)
        saving += time.perf_counter() - t0

    start = time.perf_counter()
    ep.render(jobs, g, h, w, on_images=keep)
    seconds = (time.perf_counter() - start - saving) / len(jobs)
    info = {"macs_ratio": macs, "seconds_per_image": seconds, "guidance": ep.guidance(g)}
    return [small[j.index] for j in jobs], info


def _read_images(t: Target, captions: list[str], resolution: int) -> tuple[list[Image.Image], dict[str, Any]]:
    # `aptp generate`'s manifest.jsonl (prompt, file) or an imagefolder's metadata.jsonl (text, file_name)
    folder = Path(t.path)
    manifest = folder / "manifest.jsonl"
    rows = [json.loads(line) for line in (manifest if manifest.is_file() else folder / "metadata.jsonl")
            .read_text().splitlines() if line.strip()]
    by_prompt = {}
    for r in rows:
        prompt, file = r.get("prompt", r.get("text")), r.get("file", r.get("file_name"))
        by_prompt.setdefault(prompt, {**r, "file": file})
    missing = [c for c in captions if c not in by_prompt]
    if missing:
        raise AptpUserError(f"{t.path}: its manifest has no image for {len(missing)} evaluation captions "
                            f"(e.g. {missing[0]!r}); generate them with `aptp generate ... --prompts FILE`")
    chosen = [by_prompt[c] for c in captions]
    ratios = [r.get("macs_ratio") for r in chosen]
    macs = sum(ratios) / len(ratios) if all(isinstance(x, (int, float)) for x in ratios) else None
    scales = {r.get("guidance") for r in chosen}
    info = {"macs_ratio": macs, "seconds_per_image": None, "guidance": scales.pop() if len(scales) == 1 else None}
    from aptp.metrics import resize_for_eval

    return [resize_for_eval(Image.open(Path(t.path) / r["file"]), resolution) for r in chosen], info


def _stored(t: Target, captions: list[str], metrics: list[str], clip, fid,
            resolution: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(per-image tensors, info) of an embeddings target, checked against this evaluation's
    captions, resolution and feature networks."""
    from aptp.metrics.embeddings import load_embeddings

    stored = load_embeddings(t.path)
    fidnet = fid if fid is not None else clip
    needed = {}
    if {"clip", "cmmd"} & set(metrics):
        needed["clip_image"] = clip.feature_id
    if "fid" in metrics:
        needed["fid_image"] = fidnet.feature_id
    stored.check_features(needed, resolution)
    if "pickscore" in metrics and "pickscore" not in stored.tensors:
        raise AptpUserError(f"{t.path}: has no PickScores; save it with the metrics you evaluate now")
    kept = stored.select(captions)
    if "clip" in metrics:  # recomputed: the captions are checked equal, the text tower is the one checked
        from aptp.metrics import clip_scores_from_features

        kept["clip"] = clip_scores_from_features(kept["clip_image"], clip.text_features(captions))
    keys = ("macs_ratio", "seconds_per_image", "guidance")
    return kept, {**{k: stored.info.get(k) for k in keys}, "source": stored.target}


def _embeddings_name(t: Target, taken: set[str]) -> str:
    """``<target's folder name>.safetensors``, made unique among the names already taken."""
    base = Path(t.name.rstrip("/")).name.replace(":", "_").removesuffix(".safetensors") or "target"
    name, k = f"{base}.safetensors", 2
    while name in taken:
        name, k = f"{base}-{k}.safetensors", k + 1
    taken.add(name)
    return name


def _per_image(kept: dict[str, torch.Tensor], metrics: list[str], clip, fid, dataset_id: str,
               load_real: Callable[[], list[Image.Image]]) -> dict[str, Any]:
    """What the bootstrap resamples, per metric: ``{"clip": (N,) scores, "pickscore": (N,) scores,
    "fid": (real stats, (N, d) features), "cmmd": ((M, d) real, (N, d) generated embeddings)}``,
    from what :func:`~aptp.metrics.embed_images` computed per image (``kept``: no image is
    embedded twice). The real statistics come from the cache it has just filled (same key), so
    the real images are not read again.
    """
    from aptp.metrics import real_statistics

    out: dict[str, Any] = {}
    fidnet = fid if fid is not None else clip
    for m in PER_PROMPT:
        if m in metrics:
            out[m] = kept[m].detach().to(torch.float64).cpu()
    if "cmmd" in metrics:
        real = real_statistics(dataset_id, clip, load_real, keep_features=True)
        out["cmmd"] = (real.features, kept["clip_image"])
    if "fid" in metrics:
        real = real_statistics(dataset_id, fidnet, load_real)
        out["fid"] = (real, kept["fid_image"])
    return out


def _statistic(metric: str, data: Any, cmmd_estimator: str):
    from aptp.metrics.bootstrap import cmmd_statistic, fd_statistic, mean_statistic

    if metric == "fid":
        return fd_statistic(*data)
    if metric == "cmmd":
        return cmmd_statistic(*data, estimator=cmmd_estimator)
    return mean_statistic(data)


def add_intervals(rows: list[dict[str, Any]], distributions: list[dict[str, torch.Tensor]],
                  reference_index: int, resamples: int, seed: int) -> None:
    """Add to each row ``bootstrap = {"reference", "resamples", "seed", "metrics": {metric:
    {"value", "ci95", "delta", "delta_ci95"}}}``: the target's 95% interval and its paired
    difference from the reference target (0 with ``[0, 0]`` for the reference itself)."""
    from aptp.metrics.bootstrap import paired_summary, summary

    ref_row, ref_dist = rows[reference_index], distributions[reference_index]
    for row, dist in zip(rows, distributions):
        per = {}
        for metric, d in dist.items():
            centre = metric not in PER_PROMPT  # set statistics: their draws are biased by repeated images
            entry = {**summary(row[metric], d, centre=centre), "resamples": int(d.numel())}
            if metric in ref_dist:
                entry.update(paired_summary(row[metric], ref_row[metric], d, ref_dist[metric], centre=centre))
            per[metric] = entry
        row["bootstrap"] = {"reference": ref_row["target"], "resamples": resamples, "seed": seed, "metrics": per}


def evaluate(targets: list[str], settings: Settings, *, images_dir: Path | None = None,
             on_target: Callable[[str], None] | None = None,
             reference_target: str | None = None,
             embeddings_dir: Path | None = None) -> list[dict[str, Any]]:
    """Evaluate every target on the same captions and real images; one result row per target.

    Each row keeps the per-prompt CLIP scores and PickScores (``per_image``) and, with
    ``eval.bootstrap`` resamples (0 = off), the 95% bootstrap interval of every metric and the
    paired difference from ``reference_target`` (a target as given; default the first): see
    :func:`add_intervals` and :mod:`aptp.metrics.bootstrap`. With ``embeddings_dir`` each
    target's per-image features go there (:mod:`aptp.metrics.embeddings`), to be given back as
    targets later.
    """
    from aptp.metrics import PickScore, embed_images, score_embeddings
    from aptp.metrics.embeddings import save_embeddings
    from aptp.metrics.bootstrap import bootstrap_distribution, resample_indices

    if reference_target is not None and reference_target not in targets:
        raise AptpUserError(f"--reference {reference_target}: not one of the targets ({', '.join(targets)}); "
                            "give it exactly as it is given among the targets")
    ref_index = targets.index(reference_target) if reference_target is not None else 0
    parsed = [classify(t) for t in targets]
    e = settings.eval
    captions, load_real, key = reference(settings, e.limit)
    clip, fid = feature_networks(settings)
    pick = PickScore.from_pretrained(e.pickscore_model) if "pickscore" in e.metrics else None
    tiers = tiers_of(settings, len(captions))
    indices = resample_indices(len(captions), e.bootstrap, e.bootstrap_seed) if e.bootstrap > 0 else None
    rows, distributions = [], []
    saved: set[str] = set()
    for t in parsed:
        if on_target is not None:
            on_target(t.name)
        folder = None
        if images_dir is not None and t.kind != "images":
            folder = images_dir / Path(t.name).name.replace(":", "_")
            folder.mkdir(parents=True, exist_ok=True)
        if t.kind == "embeddings":
            kept, info = _stored(t, captions, list(e.metrics), clip, fid, e.resolution)
        else:
            if t.kind == "images":
                images, info = _read_images(t, captions, e.resolution)
            else:
                images, info = _generate_target(t, settings, captions, folder)
            kept = embed_images(images, captions, e.metrics, clip, fid, e.resolution, pick)
            if embeddings_dir is not None:
                ids = {"clip_image": clip.feature_id, "fid_image": (fid if fid is not None else clip).feature_id}
                save_embeddings(embeddings_dir / _embeddings_name(t, saved), kept, captions, target=t.name,
                                kind=t.kind, resolution=e.resolution, feature_ids=ids, info=info)
        # the real images are read only if their statistics are not cached yet (once at most)
        scores = score_embeddings(kept, load_real, e.metrics, clip, fid, key, e.resolution,
                                  cmmd_estimator=e.cmmd_estimator)
        row = {"target": t.name, "kind": t.kind, **info,
               **scores, "cmmd_estimator": e.cmmd_estimator}
        wanted = list(e.metrics) if indices is not None else [m for m in e.metrics if m in PER_PROMPT]
        data = _per_image(kept, wanted, clip, fid, f"{key}@{e.resolution}px", load_real)
        if tiers is not None and "clip" in data:
            for tier in dict.fromkeys(tiers):
                mask = torch.tensor([x == tier for x in tiers])
                row[f"clip_{tier}"] = float(data["clip"][mask].mean())
        row["per_image"] = {m: [float(x) for x in data[m]] for m in PER_PROMPT if m in data}
        if indices is not None:
            # per-prompt means are cheap; FD / CMMD recompute a set statistic per draw, so they take
            # the first eval.bootstrap_sets draws (the same ones for every target: still paired)
            draws = {m: indices if m in PER_PROMPT else indices[: e.bootstrap_sets] for m in e.metrics}
            distributions.append({m: bootstrap_distribution(_statistic(m, data[m], e.cmmd_estimator), draws[m])
                                  for m in e.metrics if m in data and len(draws[m])})
        rows.append(row)
    if indices is not None:
        add_intervals(rows, distributions, ref_index, e.bootstrap, e.bootstrap_seed)
    return rows
