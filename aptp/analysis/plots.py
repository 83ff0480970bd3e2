"""PNG figures of the experts: block-level retained MACs, prompt shares, tier mix, sample grid,
and the pruning run's training curves.

Figures are drawn on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, never through
``pyplot``: no global figure state, no display needed, safe in worker threads. Every function
writes its PNG atomically and returns the path. Experts appear in the order of the input frame
(the CLI sorts them by MACs ratio, as the paper's figures are). Colours follow the paper's
Fig. 9: darker blue = more of the model kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from aptp.io import atomic_path

CMAP = "Blues"
LINE_CMAP = "viridis"  # dark purple = smallest expert, yellow = largest
DPI = 120


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _colour(cmap, value: float):
    # keep the lightest tenth of the map out: a near-white line or bar is invisible
    return cmap(0.15 + 0.85 * float(np.clip(value, 0.0, 1.0)))


def _label(k: int, labels: Mapping[int, str] | None) -> str:
    return labels.get(k, f"expert {k}") if labels else f"expert {k}"


def plot_block_ratios(blocks: pd.DataFrame, path: str | Path, labels: Mapping[int, str] | None = None,
                      title: str = "Block-level retained MACs per expert") -> Path:
    """The paper's Figs. 11–12 as two panels: a line per expert across the U-Net's blocks (in
    execution order, coloured by the expert's overall MACs ratio) and a heat map with the exact
    ratio written in each block.

    Args:
        blocks: long table with columns ``expert``, ``block``, ``ratio`` (and ``macs``,
            ``full_macs`` to colour by the overall ratio), e.g. from
            :func:`aptp.analysis.blocks.expert_block_table`. The ``other`` block (conv_in, time
            embedding, conv_out) is left out, as in the paper.
        path: PNG to write.
        labels: display name per expert (default ``expert K``).
    """
    from matplotlib import colormaps

    df = blocks[blocks["block"] != "other"]
    experts = list(dict.fromkeys(df["expert"]))
    order = list(dict.fromkeys(df["block"]))
    mat = df.pivot(index="expert", columns="block", values="ratio").loc[experts, order]
    if {"macs", "full_macs"} <= set(blocks.columns):
        tot = blocks.groupby("expert")[["macs", "full_macs"]].sum()
        overall = (tot["macs"] / tot["full_macs"]).to_dict()
    else:
        overall = mat.mean(axis=1).to_dict()
    # lines: a budget-ordered palette spread over the experts' own range, so neighbours differ
    lines = colormaps[LINE_CMAP]
    lo, hi = min(overall.values()), max(overall.values())
    span = hi - lo if hi > lo else 1.0
    short = [b.replace("down_blocks.", "down ").replace("up_blocks.", "up ").replace("mid_block", "mid") for b in order]
    n, m = len(experts), len(order)
    fig = _figure(max(6.0, 0.85 * m + 3.0), 3.2 + 0.32 * n + 0.8)
    top, bottom = fig.subplots(2, 1, height_ratios=[3.0, max(1.2, 0.32 * n + 0.6)])
    x = np.arange(m)
    for k in experts:
        top.plot(x, mat.loc[k].to_numpy(), marker="o", ms=3.5, lw=1.4, color=lines(0.9 * (overall[k] - lo) / span),
                 label=f"{_label(k, labels)}")
    top.set_xticks(x, short)
    top.set_ylim(0, 1.05)
    top.set_ylabel("retained MACs ratio")
    top.grid(alpha=0.3)
    top.set_title(title)
    if n <= 16:
        top.legend(fontsize=7, ncol=2 if n > 8 else 1, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    im = bottom.imshow(mat.to_numpy(dtype=float), cmap=CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    bottom.set_xticks(x, short)
    bottom.set_yticks(np.arange(n), [_label(k, labels) for k in experts], fontsize=8)
    for i in range(n):
        for j in range(m):
            v = float(mat.iat[i, j])
            bottom.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=bottom, shrink=0.9, label="ratio")
    return _save(fig, path)


def plot_shares(summary: pd.DataFrame, path: str | Path, labels: Mapping[int, str] | None = None,
                title: str = "Share of prompts per expert") -> Path:
    """Bar per expert: its share of the routed prompts, coloured by and annotated with its MACs ratio.

    Args:
        summary: indexed by expert, with columns ``share`` and ``macs_ratio`` (``prompts`` too,
            if present, is printed under the ratio).
        path: PNG to write.
        labels: display name per expert.
    """
    from matplotlib import colormaps

    cmap = colormaps[CMAP]
    experts = list(summary.index)
    n = len(experts)
    fig = _figure(max(5.0, 0.6 * n + 2.0), 3.6)
    ax = fig.subplots()
    x = np.arange(n)
    shares = summary["share"].to_numpy(dtype=float)
    ratios = summary["macs_ratio"].to_numpy(dtype=float)
    ax.bar(x, shares, color=[_colour(cmap, r) for r in ratios], edgecolor="0.3", lw=0.5)
    for i, k in enumerate(experts):
        text = f"{ratios[i]:.2f}"
        if "prompts" in summary.columns:
            text += f"\n({int(summary.loc[k, 'prompts'])})"
        ax.text(x[i], shares[i], text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [_label(k, labels).replace("expert ", "E") for k in experts], fontsize=8)
    ax.set_ylim(0, max(shares.max(initial=0.0) * 1.3, 0.05))
    ax.set_ylabel("share of prompts")
    ax.set_title(f"{title}\n(above each bar: MACs ratio, and number of prompts)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_tier_mix(mix: pd.DataFrame, path: str | Path, labels: Mapping[int, str] | None = None,
                  title: str = "Difficulty tiers of the prompts routed to each expert") -> Path:
    """Stacked horizontal bar per expert: the fraction of each tier (columns, easiest first)."""
    from matplotlib import colormaps

    experts = list(mix.index)
    tiers = list(mix.columns)
    n = len(experts)
    cmap = colormaps["YlOrRd"]
    fig = _figure(7.0, 1.4 + 0.35 * n)
    ax = fig.subplots()
    left = np.zeros(n)
    y = np.arange(n)
    for j, t in enumerate(tiers):
        vals = mix[t].to_numpy(dtype=float)
        ax.barh(y, vals, left=left, color=cmap(0.2 + 0.7 * j / max(1, len(tiers) - 1)), edgecolor="white",
                lw=0.5, label=t)
        for i in range(n):
            if vals[i] >= 0.08:
                ax.text(left[i] + vals[i] / 2, y[i], f"{vals[i]:.0%}", ha="center", va="center", fontsize=7)
        left += vals
    ax.set_yticks(y, [_label(k, labels) for k in experts], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of the expert's prompts")
    ax.set_title(title, fontsize=10)
    ax.legend(ncol=len(tiers), fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    return _save(fig, path)


def sample_grid(images_per_expert: Mapping[int, Sequence], path: str | Path,
                labels: Mapping[int, str] | None = None, captions: Mapping[int, Sequence[str]] | None = None,
                title: str = "Samples per expert") -> Path:
    """A row of generated images per expert (the paper's Figs. 13–14).

    Args:
        images_per_expert: PIL images per expert, in row order; an expert with none gets a row
            saying so.
        path: PNG to write.
        labels: row label per expert.
        captions: the prompt of each image, printed small under it.
    """
    experts = list(images_per_expert)
    cols = max([len(v) for v in images_per_expert.values()] + [1])
    rows = max(1, len(experts))
    cell = 1.5
    fig = _figure(1.2 + cell * cols, 0.5 + (cell + (0.3 if captions else 0.0)) * rows)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    fig.suptitle(title, fontsize=10)
    for i in range(rows):
        k = experts[i] if experts else None
        images = list(images_per_expert.get(k, [])) if k is not None else []
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < len(images):
                ax.imshow(np.asarray(images[j].convert("RGB")), interpolation="nearest")
                if captions and k in captions and j < len(captions[k]):
                    ax.set_xlabel(_shorten(captions[k][j]), fontsize=5)
            elif j == 0:
                ax.text(0.5, 0.5, "no prompts routed", ha="center", va="center", fontsize=7, color="0.4",
                        transform=ax.transAxes)
        if k is not None:
            axes[i, 0].set_ylabel(_label(k, labels), fontsize=8)
    return _save(fig, path)


TRAINING_PANELS = (
    ("loss", "total loss"), ("loss_ddpm", "DDPM"), ("loss_distill_output", "distill (output)"),
    ("loss_distill_block", "distill (blocks)"), ("loss_resource", "resource"),
    ("loss_contrastive", "contrastive"), ("loss_assign", "assignment consistency"),
    ("macs_ratio", "routed MACs ratio"), ("busiest_share", "busiest expert's share"),
)


def plot_training_curves(metrics: pd.DataFrame, path: str | Path, budget: float | None = None,
                         warmup_steps: int | None = None, title: str | None = None) -> Path:
    """One panel per logged quantity of ``metrics.jsonl`` (rows = logged steps), against step.

    Panels whose column is absent or all-missing are left out; the budget is drawn on the MACs
    panel and the end of the warm-up as a dotted line on every panel.
    """
    panels = [(c, t) for c, t in TRAINING_PANELS if c in metrics and metrics[c].notna().any()]
    if not panels or "step" not in metrics:
        raise ValueError("metrics have no step column or no known quantity to plot")
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig = _figure(4.0 * cols, 2.6 * rows)
    for i, (col, name) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(metrics["step"], metrics[col], color="#1f4e8c", linewidth=1.2)
        if col == "macs_ratio" and budget is not None:
            ax.axhline(budget, color="#c0392b", linestyle="--", linewidth=1, label=f"budget {budget:g}")
            ax.legend(loc="upper right", fontsize=8)
        if warmup_steps:
            ax.axvline(warmup_steps, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    fig.suptitle(title or "Pruning: training curves (dotted: end of warm-up)", fontsize=11)
    return _save(fig, path)


def _shorten(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
