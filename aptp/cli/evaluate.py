"""`aptp eval`: the paper's metrics for several runs / models side by side."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from aptp.cli.common import RecipeOpt, SetOpt, command, err, out, settings_from, setup_logging
from aptp.errors import AptpUserError

COLUMNS = [("target", "target"), ("macs_ratio", "MACs ratio"), ("seconds_per_image", "s/img"), ("guidance", "CFG"), ("fid", "FD"),
           ("clip", "CLIP"), ("cmmd", "CMMD"), ("pickscore", "PickScore")]


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def check_generation_steps(targets: list[str], s) -> None:
    """One line before anything is loaded if a target that generates (a run or a model) has a
    scheduler that cannot run ``generate.steps`` steps."""
    from aptp.evaluate import classify
    from aptp.rundir import RunDir
    from aptp.schedulers import check_model_steps

    models = []
    for target in targets:
        t = classify(target)
        if t.kind == "run":
            models.append(RunDir(t.path).settings.model.name)
        elif t.kind == "model":
            models.append(t.path)
    for model in dict.fromkeys(models):
        check_model_steps(model, s.generate.scheduler, s.generate.steps)


@command
def evaluate(
    targets: Annotated[list[str], typer.Argument(help="Run directories (RUN@initial / RUN@finetuned pick the expert weights; default: fine-tuned if present), models (alias / folder / hub id) or folders of generated images with manifest.jsonl.")],
    data: Annotated[Optional[str], typer.Option(help="Data set whose evaluation captions and images are used (default: the first run's, else shapes).")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Root of coco / cc3m.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N captions of the split.")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Comma list of fid,clip,cmmd,pickscore.")] = None,
    fid_features: Annotated[Optional[str], typer.Option(help="FID feature network (see docs); default auto.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default 25).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the model's recommended, 7.5 for SD 2.1, 3 for toy).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results.csv, results.json and the generated images here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --output.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json (stdout).")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate for the evaluation captions and report FID, CLIP score, CMMD (PickScore), MACs and s/img."""
    from aptp.evaluate import evaluate as run_eval
    from aptp.evaluate import run_path
    from aptp.io import prepare_output_dir
    from aptp.settings import write_settings

    if fmt not in ("table", "csv", "json"):
        raise AptpUserError(f"--format {fmt}: expected table, csv or json")
    first_run = next((p for p in map(run_path, targets) if p is not None), None)
    if recipe is None and first_run is not None:
        recipe = first_run / "settings.yaml"
    metric_list = [m.strip() for m in metrics.split(",")] if metrics else None
    s = settings_from(recipe, set_, data__name=data, data__root=data_root, eval__limit=limit,
                      eval__metrics=metric_list, eval__fid_features=fid_features, generate__steps=steps,
                      generate__guidance=guidance)
    check_generation_steps(targets, s)
    setup_logging(quiet)
    out_dir = prepare_output_dir(output, overwrite=overwrite, resume=False) if output is not None else None
    rows = run_eval(targets, s, images_dir=out_dir / "images" if out_dir else None,
                    on_target=None if quiet else (lambda name: err.print(f"evaluating {name} ...", markup=False)))
    if out_dir is not None:
        write_settings(s, out_dir)
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
        with open(out_dir / "results.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if fmt == "json":
        out.print_json(json.dumps(rows))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        out.file.write(buf.getvalue())
    else:
        tier_cols = [(k, k.replace("clip_", "CLIP ")) for k in rows[0] if k.startswith("clip_") and k != "clip_features"]
        shown = [(k, label) for k, label in COLUMNS + tier_cols if any(r.get(k) is not None for r in rows)]
        n = rows[0].get("n_images")
        t = Table(title=f"{s.data.name} {s.eval.split}: {n} prompts, images at {s.eval.resolution}px "
                        f"(features: {rows[0].get('clip_features') or rows[0].get('fid_features')})")
        for _, label in shown:
            t.add_column(label, justify="left" if label == "target" else "right")
        for r in rows:
            t.add_row(*[_fmt(r.get(k)) for k, _ in shown])
        out.print(t)
