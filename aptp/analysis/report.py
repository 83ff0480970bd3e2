"""What each expert of a run became (``aptp inspect-experts``): the core, without Typer.

:func:`build_report` routes the captions of one split of the run's data set through the trained
router and joins, per expert, the records of ``experts.json`` (MACs ratio, parameters) with the
share of the routed prompts, their most frequent words (:func:`aptp.analysis.words.word_table`)
and, for the shapes world, their difficulty-tier mix. The *validation* split is the default:
it shows how the router generalises to prompts it was not trained on, as the paper's analysis of
the validation sets does. Renderers turn the report into markdown, CSV or JSON text.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from aptp.analysis.words import STOP_WORDS, CountMode, tier_mix, word_table

logger = logging.getLogger(__name__)


@dataclass
class ExpertReport:
    """Per-expert summary of one routed split.

    Attributes:
        summary: indexed by expert, rows in display order (MACs ratio ascending, as the paper's
            tables): ``macs_ratio``, ``params``, ``prompts``, ``share``, ``words``, ``counts``.
        tiers: tier fractions per expert (same row order) for the shapes world, else None.
        prompts: the routed captions, in data order.
        experts: the expert of each caption.
        split: the split the captions came from.
        count: how words were counted (``prompt`` or ``occurrence``).
        blocks: the long block-MACs table (:func:`aptp.analysis.blocks.expert_block_table`),
            filled in on demand by :meth:`block_table`.
    """

    summary: pd.DataFrame
    tiers: pd.DataFrame | None
    prompts: list[str]
    experts: list[int]
    split: str
    count: str
    run: Any = None
    blocks: pd.DataFrame | None = field(default=None, repr=False)

    def block_table(self) -> pd.DataFrame:
        if self.blocks is None:
            from aptp.analysis.blocks import expert_block_table

            self.blocks = expert_block_table(self.run)
        return self.blocks

    def labels(self) -> dict[int, str]:
        """Display name per expert: ``expert K (ratio)``, as in the paper's tables."""
        return {int(k): f"expert {k} ({r:.2f})" for k, r in self.summary["macs_ratio"].items()}


def split_captions(run, split: str, limit: int | None = None) -> tuple[list[str], list[str] | None]:
    """The captions of ``split`` of the run's data set (at most ``limit``), and their tiers for the
    shapes world (None otherwise). The world seed is the run's seed, as ``aptp materialize`` uses."""
    from aptp.data import build_dataset
    from aptp.data.registry import ShapesCaptions

    s = run.settings
    ds = build_dataset(s.data, split=split, seed=s.seed)
    captions = ds.captions()
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        captions = captions[:limit]
    tiers = None
    if isinstance(ds, ShapesCaptions):
        world, name = ds.shapes.world, ds.shapes.split
        tiers = [world.tier(name, i) for i in range(len(captions))]
    return captions, tiers


def build_report(run, split: str = "validation", top_k: int = 5, limit: int | None = None,
                 extra_stop_words: tuple[str, ...] | list[str] = (), count: CountMode = "prompt",
                 sort: str = "macs") -> ExpertReport:
    """Route a split of the run's captions and summarise every expert.

    Args:
        run: a :class:`~aptp.rundir.RunDir` with a trained router and ``experts.json``.
        split: ``train`` or ``validation``.
        top_k: words per expert.
        limit: route only the first ``limit`` captions of the split.
        extra_stop_words: words to leave out in addition to :data:`~aptp.analysis.words.STOP_WORDS`.
        count: ``prompt`` (a word once per prompt) or ``occurrence``.
        sort: row order, ``macs`` (MACs ratio ascending, ties by index) or ``expert``.
    """
    from aptp.experts import route_prompts

    if sort not in ("macs", "expert"):
        raise ValueError(f"sort must be 'macs' or 'expert', got {sort!r}")
    records = run.experts()  # fails first, with the command to run, if not materialized
    captions, tiers = split_captions(run, split, limit)
    routed = route_prompts(run, captions)
    experts = [r["expert"] for r in routed]
    n = len(records)
    words = word_table(captions, experts, top_k=top_k, stop_words=STOP_WORDS,
                       extra_stop_words=extra_stop_words, count=count, num_experts=n)
    info = pd.DataFrame([{"expert": int(e["expert"]), "macs_ratio": float(e["macs_ratio"]), "params": int(e["params"])}
                         for e in records]).set_index("expert")
    summary = info.join(words, how="left")
    order = sorted(summary.index, key=lambda k: (summary.loc[k, "macs_ratio"], k) if sort == "macs" else k)
    summary = summary.loc[order]
    mix = tier_mix(tiers, experts, num_experts=n).loc[order] if tiers is not None else None
    logger.info("routed %d %s captions to %d experts", len(captions), split, n)
    return ExpertReport(summary=summary, tiers=mix, prompts=captions, experts=experts, split=split, count=count,
                        run=run)


# ---------------------------------------------------------------------------- renderers
def words_text(words: list[str], counts: list[int], sep: str = " - ") -> str:
    """``view (12) - sunset (9)``: the paper's word lists, with counts."""
    return sep.join(f"{w} ({c})" for w, c in zip(words, counts))


def tiers_text(row: pd.Series) -> str:
    return " ".join(f"{t} {v:.0%}" for t, v in row.items())


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(report: ExpertReport) -> str:
    """A GitHub markdown table, one row per expert (written here: no ``tabulate`` dependency)."""
    head = ["expert", "MACs ratio", "params", "prompts", "share", "most frequent words"]
    if report.tiers is not None:
        head.append("tiers")
    align = ["---:", "---:", "---:", "---:", "---:", ":---"] + ([":---"] if report.tiers is not None else [])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    for k, r in report.summary.iterrows():
        cells = [str(k), f"{r['macs_ratio']:.3f}", f"{int(r['params']):,}", str(int(r["prompts"])),
                 f"{r['share']:.1%}", words_text(r["words"], r["counts"]) or "-"]
        if report.tiers is not None:
            cells.append(tiers_text(report.tiers.loc[k]))
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(report: ExpertReport, top_k: int) -> str:
    """CSV, one row per expert: numbers, then ``word_i``/``count_i`` pairs, then ``tier_<name>``."""
    tier_cols = [f"tier_{t}" for t in report.tiers.columns] if report.tiers is not None else []
    head = ["expert", "macs_ratio", "params", "prompts", "share"]
    for i in range(1, top_k + 1):
        head += [f"word_{i}", f"count_{i}"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head + tier_cols)
    for k, r in report.summary.iterrows():
        row: list[Any] = [k, repr(float(r["macs_ratio"])), int(r["params"]), int(r["prompts"]), repr(float(r["share"]))]
        for i in range(top_k):
            has = i < len(r["words"])
            row += [r["words"][i] if has else "", r["counts"][i] if has else ""]
        if report.tiers is not None:
            row += [repr(float(v)) for v in report.tiers.loc[k]]
        w.writerow(row)
    return buf.getvalue()


def to_records(report: ExpertReport, blocks: pd.DataFrame | None = None) -> dict[str, Any]:
    """JSON-ready dict: the split, the counting mode and one record per expert (with its
    block-level retained-MAC ratios when ``blocks`` is given)."""
    ratios: dict[int, dict[str, float]] = {}
    if blocks is not None:
        for row in blocks.itertuples():
            ratios.setdefault(int(row.expert), {})[row.block] = float(row.ratio)
    experts = []
    for k, r in report.summary.iterrows():
        rec: dict[str, Any] = {"expert": int(k), "macs_ratio": float(r["macs_ratio"]), "params": int(r["params"]),
                               "prompts": int(r["prompts"]), "share": float(r["share"]),
                               "words": [{"word": w, "count": int(c)} for w, c in zip(r["words"], r["counts"])]}
        if report.tiers is not None:
            rec["tiers"] = {t: float(v) for t, v in report.tiers.loc[k].items()}
        if blocks is not None:
            rec["block_macs_ratio"] = ratios.get(int(k), {})
        experts.append(rec)
    return {"split": report.split, "prompts": len(report.prompts), "count": report.count, "experts": experts}


def to_json(report: ExpertReport, blocks: pd.DataFrame | None = None) -> str:
    return json.dumps(to_records(report, blocks), indent=1) + "\n"


# ---------------------------------------------------------------------------- samples
def sample_prompts(report: ExpertReport, n: int) -> dict[int, list[tuple[int, str]]]:
    """The first ``n`` prompts routed to each expert, as (data index, prompt), in display order."""
    picked: dict[int, list[tuple[int, str]]] = {int(k): [] for k in report.summary.index}
    for i, (p, k) in enumerate(zip(report.prompts, report.experts)):
        if k in picked and len(picked[k]) < n:
            picked[k].append((i, p))
    return picked


def render_samples(report: ExpertReport, n: int, steps: int | None = None, weights: str = "auto",
                   pipe=None) -> tuple[dict[int, list], dict[int, list[str]]]:
    """Generate ``n`` images per expert from its own routed prompts (seed = generate.seed + data
    index, so an image can be regenerated with ``aptp generate --expert K --seed ...``).

    Returns:
        (images per expert, prompts per expert), both in display order.
    """
    from aptp.generate import ExpertPipeline, Job, generation_size

    run = report.run
    s = run.settings
    g = s.generate if steps is None else s.generate.model_copy(update={"steps": steps})
    picked = sample_prompts(report, n)
    jobs = [Job(i, p, k, g.seed + i) for k, items in picked.items() for i, p in items]
    if not jobs:
        return {k: [] for k in picked}, {k: [] for k in picked}
    if pipe is None:
        from aptp.train.teacher import load_teacher

        pipe = load_teacher(s.model).pipeline
    height, width = generation_size(s, g)
    images = ExpertPipeline(run, pipe, weights=weights).render(jobs, g, height, width)
    return ({k: [images[i] for i, _ in items] for k, items in picked.items()},
            {k: [p for _, p in items] for k, items in picked.items()})
