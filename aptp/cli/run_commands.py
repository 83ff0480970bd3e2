"""Commands that read a run directory: `materialize`, `route`, `finetune`, `generate`."""

from __future__ import annotations

import csv
import io
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from aptp.cli.common import SetOpt, command, err, out, setup_logging
from aptp.cli.progress import LogFormat, TrainProgress
from aptp.errors import AptpUserError

RunArg = Annotated[Path, typer.Argument(help="Run directory written by `aptp prune`.")]
PromptsArg = Annotated[Optional[list[str]], typer.Argument(help="Prompts (or use --prompts).")]
PromptsFileOpt = Annotated[Optional[str], typer.Option("--prompts", help="File with one prompt per line; - reads stdin.")]


def run_settings(run, overrides: list[str] | None, **flags):
    """The run's resolved settings.yaml as the recipe, then APTP_* env, flags and --set on top."""
    from aptp.settings import resolve_settings

    cli = {k.replace("__", "."): v for k, v in flags.items()}
    return resolve_settings(recipe=run.path / "settings.yaml", cli=cli, overrides=overrides or ())


class RouteFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"
    table = "table"


@command
def materialize(
    run_dir: RunArg,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing experts.")] = False,
    align: Annotated[int, typer.Option("--align", min=1, help="Round kept channels of every layer to a multiple "
                                       "of this (e.g. 8 or 64) within each expert's MACs; 1 = off.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Slice the teacher into one real, smaller U-Net per code (experts/expert-K) + experts.json."""
    from aptp.experts import materialize as run_materialize
    from aptp.rundir import RunDir

    setup_logging(quiet)
    run = RunDir(run_dir)
    records = run_materialize(run, overwrite=overwrite, align=align)
    from aptp.cli.inspect_model import SHORT

    t = Table(title=f"{len(records)} experts in {run.path / 'experts'}")
    kinds = list(records[0]["units_kept"]) if records else []  # the backbone's unit kinds, in order
    for col in ("expert", "MACs ratio", "params", "share", *[SHORT.get(k, k) for k in kinds]):
        t.add_column(col, justify="right")
    for r in records:
        u = r["units_kept"]
        t.add_row(str(r["expert"]), f"{r['macs_ratio']:.3f}", f"{r['params']:,}", f"{r['share']:.1%}",
                  *[str(u[k]) for k in kinds])
    out.print(t)


@command
def route(
    run_dir: RunArg,
    prompts: PromptsArg = None,
    prompts_file: PromptsFileOpt = None,
    fmt: Annotated[RouteFormat, typer.Option("--format", help="jsonl, csv or table.")] = RouteFormat.jsonl,
    data: Annotated[bool, typer.Option("--data", help="Route the run's data set captions and write routes/<split>/expert-K.json.")] = False,
    split: Annotated[str, typer.Option(help="With --data: the split to route.")] = "train",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With --data: replace existing index files.")] = False,
) -> None:
    """Route prompts to experts (cosine to the hard codes, no noise); one record per prompt, in order."""
    from aptp.experts import read_prompts, route_prompts, write_route_index
    from aptp.rundir import RunDir

    setup_logging(True)
    run = RunDir(run_dir)
    if data:
        counts = write_route_index(run, split, overwrite=overwrite)
        total = sum(counts.values())
        for k, n in counts.items():
            out.print(json.dumps({"expert": k, "prompts": n, "share": n / max(1, total)}), markup=False)
        err.print(f"wrote {run.routes_dir(split)}/expert-*.json ({total} prompts)", markup=False)
        return
    records = route_prompts(run, read_prompts(prompts or [], prompts_file))
    if fmt is RouteFormat.jsonl:
        for r in records:
            out.file.write(json.dumps(r) + "\n")
    elif fmt is RouteFormat.csv:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["prompt", "expert", "macs_ratio", "similarity"])
        w.writeheader()
        w.writerows(records)
        out.file.write(buf.getvalue())
    else:
        t = Table()
        for col in ("prompt", "expert", "MACs ratio", "similarity"):
            t.add_column(col)
        for r in records:
            mr = "" if r["macs_ratio"] is None else f"{r['macs_ratio']:.3f}"
            t.add_row(r["prompt"], str(r["expert"]), mr, f"{r['similarity']:.4f}")
        out.print(t)
    out.file.flush()


def parse_experts(value: str, n: int) -> list[int]:
    if value == "all":
        return list(range(n))
    try:
        ks = [int(x) for x in value.split(",")]
    except ValueError:
        raise AptpUserError(f"--expert {value!r}: expected 'all', K or K1,K2") from None
    bad = [k for k in ks if not 0 <= k < n]
    if bad:
        raise AptpUserError(f"--expert {value}: the run has experts 0..{n - 1}")
    return ks


@command
def finetune(
    run_dir: RunArg,
    expert: Annotated[str, typer.Option(help="all, K, or K1,K2 (one per job in a job array).")] = "all",
    steps: Annotated[Optional[int], typer.Option(help="Steps per expert.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")] = None,
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema", help="Keep and save an EMA of the weights.")] = None,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no | fp16 | bf16.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Fine-tune again, replacing earlier results.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoints.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    log_format: Annotated[LogFormat, typer.Option(help="text or json.")] = LogFormat.text,
    set_: SetOpt = None,
) -> None:
    """Fine-tune each expert on the prompts routed to it (α_DDPM·DDPM + α_distill·distillation)."""
    from aptp.rundir import RunDir
    from aptp.train.finetune import finetune as run_finetune

    run = RunDir(run_dir)
    s = run_settings(run, set_, finetune__steps=steps, finetune__batch_size=batch_size, finetune__lr=lr,
                     finetune__grad_accum=grad_accum, finetune__ema=ema, finetune__mixed_precision=mixed_precision)
    setup_logging(quiet)
    ks = parse_experts(expert, len(run.experts()))
    bars: list[TrainProgress] = []

    def factory(k: int):
        bar = TrainProgress(f"expert {k}", quiet=quiet, log_format=log_format.value)
        bar.__enter__()
        bars.append(bar)
        return bar.update

    try:
        results = run_finetune(run, s, ks, overwrite=overwrite, resume=resume, progress_factory=factory,
                               skip_empty=expert.strip() == "all",
                               log=(lambda rec: err.file.write(json.dumps({"event": "finetune", **rec}) + "\n"))
                               if log_format is LogFormat.json else None)
    finally:
        for b in bars:
            b.__exit__(None, None, None)
    for r in results:
        if r.interrupted:
            err.print(f"expert {r.expert}: interrupted at step {r.step}; continue with "
                      f"aptp finetune {run.path} --expert {r.expert} --resume", markup=False)
            raise typer.Exit(130)
        if r.path is None:
            out.print(f"expert {r.expert}: skipped, no training sample is routed to it (keeps the teacher's "
                      "kept weights)", markup=False)
            continue
        out.print(f"expert {r.expert}: {r.step} steps on {r.samples} routed samples -> {r.path}", markup=False)


@command
def generate(
    run_dir: RunArg,
    prompts: PromptsArg = None,
    prompts_file: PromptsFileOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder (default RUN_DIR/samples).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default 25).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (default: the model's recommended, 7.5 for SD 2.1, 3 for toy).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Prompt i gets seed SEED+i.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Prompts per batch within an expert's group.")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height (default: the run's resolution).")] = None,
    width: Annotated[Optional[int], typer.Option(help="Image width.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="pndm or ddim.")] = None,
    expert: Annotated[Optional[int], typer.Option(help="Force every prompt to expert K.")] = None,
    full: Annotated[bool, typer.Option("--full", help="Use the unpruned teacher (for comparison).")] = False,
    weights: Annotated[str, typer.Option(help="auto (fine-tuned if present), finetuned or initial.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    set_: SetOpt = None,
) -> None:
    """Route prompts, group them per expert and generate; PNGs + manifest.jsonl in input order."""
    from aptp.experts import read_prompts
    from aptp.generate import generate as run_generate
    from aptp.io import prepare_output_dir
    from aptp.rundir import RunDir

    run = RunDir(run_dir)
    s = run_settings(run, set_, generate__steps=steps, generate__guidance=guidance, generate__seed=seed,
                     generate__batch_size=batch_size, generate__height=height, generate__width=width,
                     generate__scheduler=scheduler)
    if weights not in ("auto", "finetuned", "initial"):
        raise AptpUserError(f"--weights {weights}: expected auto, finetuned or initial")
    if full and expert is not None:
        raise AptpUserError("--full and --expert exclude each other")
    from aptp.schedulers import check_model_steps

    check_model_steps(s.model.name, s.generate.scheduler, s.generate.steps)  # before anything is loaded or written
    setup_logging(quiet)
    texts = read_prompts(prompts or [], prompts_file)
    out_dir = prepare_output_dir(output or run.path / "samples", overwrite=overwrite, resume=False)
    bar = TrainProgress("generate", quiet=quiet)
    done = {"n": 0}

    def on_batch(n: int) -> None:
        done["n"] += n
        bar.update(done["n"], len(texts), {})

    with bar:
        manifest = run_generate(run, texts, out_dir, s.generate, expert=expert, full=full, weights=weights,
                                on_batch=on_batch)
    by_expert: dict = {}
    for m in manifest:
        by_expert[m["expert"]] = by_expert.get(m["expert"], 0) + 1
    out.print(f"{len(manifest)} images in {out_dir} (per expert: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(by_expert.items(), key=lambda kv: str(kv[0]))) + ")",
              markup=False)
