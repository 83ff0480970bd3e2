"""`aptp inspect-experts`: what each expert became (the paper's Tables 2/4 and Figs. 11-14)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from aptp.cli.common import command, err, out, setup_logging
from aptp.errors import AptpUserError

PLOT_FILES = {"blocks": "block_macs.png", "shares": "shares.png", "tiers": "tier_mix.png", "samples": "samples.png",
              "training": "training.png"}


class Format(str, Enum):
    table = "table"
    markdown = "markdown"
    csv = "csv"
    json = "json"


class Split(str, Enum):
    train = "train"
    validation = "validation"


class Count(str, Enum):
    prompt = "prompt"
    occurrence = "occurrence"


class Sort(str, Enum):
    macs = "macs"
    expert = "expert"


def planned_plots(plots: Path, shapes: bool, samples: int, training: bool = False) -> list[Path]:
    """The PNGs ``--plots`` will write, in writing order."""
    names = [PLOT_FILES["blocks"], PLOT_FILES["shares"]]
    if shapes:
        names.append(PLOT_FILES["tiers"])
    if training:
        names.append(PLOT_FILES["training"])
    if samples > 0:
        names.append(PLOT_FILES["samples"])
    return [plots / n for n in names]


def check_plot_dir(plots: Path, files: list[Path], overwrite: bool) -> None:
    if plots.exists() and not plots.is_dir():
        raise AptpUserError(f"--plots {plots}: exists and is not a folder")
    existing = [p.name for p in files if p.exists()]
    if existing and not overwrite:
        raise AptpUserError(f"--plots {plots}: {', '.join(existing)} already exist; pass --overwrite to replace them")


def rich_table(report, title: str) -> Table:
    from aptp.analysis.report import tiers_text, words_text

    t = Table(title=title)
    for col in ("expert", "MACs ratio", "params", "prompts", "share"):
        t.add_column(col, justify="right")
    t.add_column("most frequent words (prompts containing them)")
    if report.tiers is not None:
        t.add_column("tiers")
    for k, r in report.summary.iterrows():
        cells = [str(k), f"{r['macs_ratio']:.3f}", f"{int(r['params']):,}", str(int(r["prompts"])), f"{r['share']:.1%}",
                 words_text(r["words"], r["counts"]) or "-"]
        if report.tiers is not None:
            cells.append(tiers_text(report.tiers.loc[k]))
        t.add_row(*cells)
    return t


@command
def inspect_experts(
    run_dir: Annotated[Path, typer.Argument(help="Run directory with materialized experts.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Most frequent words listed per expert.")] = 5,
    fmt: Annotated[Format, typer.Option("--format", help="table, markdown, csv or json (stdout).")] = Format.table,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write block_macs.png, shares.png, samples.png "
                                                   "(and tier_mix.png for shapes) into this folder.")] = None,
    split: Annotated[Split, typer.Option(help="Data split whose captions are routed; validation shows how the "
                                         "router generalises to prompts it was not trained on.")] = Split.validation,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Route only the first N captions of the split.")] = None,
    samples: Annotated[int, typer.Option(min=0, help="With --plots: images per expert in samples.png "
                                         "(its own routed prompts); 0 skips generating.")] = 4,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Denoising steps for the samples "
                                                 "(default: the run's generate.steps).")] = None,
    weights: Annotated[str, typer.Option(help="Samples from auto (fine-tuned if present), finetuned or initial experts.")] = "auto",
    stop_word: Annotated[Optional[list[str]], typer.Option("--stop-word", help="Extra word to leave out of the "
                                                           "word lists (repeatable).")] = None,
    count: Annotated[Count, typer.Option(help="prompt: a word counts once per prompt; occurrence: every time.")] = Count.prompt,
    sort: Annotated[Sort, typer.Option(help="Row order: macs (ascending, as the paper) or expert index.")] = Sort.macs,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing PNGs in the --plots folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Per expert: MACs ratio, parameters, share of the routed prompts and their most frequent words
    (the paper's Tables 2 and 4; tier mix for shapes); --plots draws Figs. 11-12 style block MACs."""
    from aptp.analysis.report import build_report, to_csv, to_json, to_markdown
    from aptp.rundir import RunDir

    setup_logging(quiet)
    if weights not in ("auto", "finetuned", "initial"):
        raise AptpUserError(f"--weights {weights}: expected auto, finetuned or initial")
    run = RunDir(run_dir)
    shapes = run.settings.data.name == "shapes"
    metrics = run.path / "metrics.jsonl"
    has_curves = metrics.is_file() and metrics.stat().st_size > 0
    files = planned_plots(plots, shapes, samples, training=has_curves) if plots is not None else []
    if plots is not None:
        check_plot_dir(plots, files, overwrite)
    report = build_report(run, split=split.value, top_k=top_k, limit=limit, extra_stop_words=stop_word or (),
                          count=count.value, sort=sort.value)
    if fmt is Format.table:
        from aptp.rundir import read_json

        res = read_json(run.experts_json).get("macs_resolution") if run.experts_json.is_file() else None
        at = f", MACs at {res} px" if res else ""
        out.print(rich_table(report, f"{len(report.summary)} experts of {run.path}, "
                                     f"{len(report.prompts)} {report.split} prompts{at}"))
    elif fmt is Format.markdown:
        out.file.write(to_markdown(report))
    elif fmt is Format.csv:
        out.file.write(to_csv(report, top_k))
    else:
        out.file.write(to_json(report, report.block_table()))
    out.file.flush()
    if plots is not None:
        write_plots(report, plots, files, samples=samples, steps=steps, weights=weights)
        err.print(f"wrote {', '.join(str(p) for p in files)}", markup=False)


def write_plots(report, plots: Path, files: list[Path], samples: int, steps: int | None, weights: str) -> None:
    from aptp.analysis import plots as P
    from aptp.analysis.report import render_samples

    plots.mkdir(parents=True, exist_ok=True)
    labels = report.labels()
    order = list(report.summary.index)
    blocks = report.block_table()
    blocks = blocks.set_index("expert").loc[order].reset_index()  # rows in display order
    by_name = {p.name: p for p in files}
    P.plot_block_ratios(blocks, by_name[PLOT_FILES["blocks"]], labels=labels)
    P.plot_shares(report.summary, by_name[PLOT_FILES["shares"]], labels=labels,
                  title=f"Share of {len(report.prompts)} {report.split} prompts per expert")
    if PLOT_FILES["tiers"] in by_name and report.tiers is not None:
        P.plot_tier_mix(report.tiers, by_name[PLOT_FILES["tiers"]], labels=labels)
    if PLOT_FILES["training"] in by_name:
        import pandas as pd

        s = report.run.settings
        P.plot_training_curves(pd.read_json(report.run.path / "metrics.jsonl", lines=True),
                               by_name[PLOT_FILES["training"]], budget=s.prune.budget,
                               warmup_steps=s.prune.warmup_steps if s.prune.method == "aptp" else None)
    if PLOT_FILES["samples"] in by_name:
        images, prompts = render_samples(report, samples, steps=steps, weights=weights)
        P.sample_grid(images, by_name[PLOT_FILES["samples"]], labels=labels, captions=prompts,
                      title=f"First {samples} {report.split} prompts routed to each expert")
