"""`aptp eval`: the paper's metrics for several runs / models side by side."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from aptp.cli.common import RecipeOpt, SetOpt, command, err, out, settings_from, setup_logging
from aptp.errors import AptpUserError

COLUMNS = [("target", "target"), ("macs_ratio", "MACs ratio"), ("seconds_per_image", "s/img"), ("guidance", "CFG"), ("fid", "FD"),
           ("clip", "CLIP"), ("cmmd", "CMMD"), ("pickscore", "PickScore")]


METRIC_KEYS = ("fid", "clip", "cmmd", "pickscore")


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cell(r: dict, k: str) -> str:
    """A metric with its 95% interval, ``65.5 [64.9, 66.1]``, when the row has one."""
    b = (r.get("bootstrap") or {}).get("metrics", {}).get(k)
    if b is None:
        return _fmt(r.get(k))
    lo, hi = b["ci95"]
    return f"{_fmt(r.get(k))} [{_fmt(lo)}, {_fmt(hi)}]"


def _delta_cell(r: dict, k: str) -> str:
    """The paired difference from the reference with its 95% interval (``ref`` on the reference)."""
    boot = r.get("bootstrap") or {}
    b = boot.get("metrics", {}).get(k)
    if b is None or "delta" not in b:
        return "–"
    if boot.get("reference") == r["target"]:
        return "ref"
    lo, hi = b["delta_ci95"]
    return f"{b['delta']:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def flat_row(r: dict) -> dict:
    """A result row for CSV: the intervals as ``<metric>_ci95_lo`` ... ``<metric>_delta_ci95_hi``
    columns and ``reference``; the per-image scores stay in results.json."""
    flat = {k: v for k, v in r.items() if k not in ("bootstrap", "per_image")}
    boot = r.get("bootstrap")
    if boot:
        flat["reference"] = boot["reference"]
        for m, b in boot["metrics"].items():
            flat[f"{m}_ci95_lo"], flat[f"{m}_ci95_hi"] = b["ci95"]
            if "bootstrap_bias" in b:
                flat[f"{m}_bootstrap_bias"] = b["bootstrap_bias"]
            if "delta" in b:
                flat[f"{m}_delta"] = b["delta"]
                flat[f"{m}_delta_ci95_lo"], flat[f"{m}_delta_ci95_hi"] = b["delta_ci95"]
    return flat


def _write_csv(fh, rows: list[dict]) -> None:
    flat = [flat_row(r) for r in rows]
    fields = list(dict.fromkeys(k for r in flat for k in r))
    w = csv.DictWriter(fh, fieldnames=fields)
    w.writeheader()
    w.writerows(flat)


def short_names(targets: list[str]) -> tuple[list[str], str | None]:
    """Targets as the table shows them: relative to the folder they share, when two or more
    share one (``runs/study/gen/aptp-s0-g3`` → ``aptp-s0-g3`` under ``runs/study/gen``), so rows
    whose paths differ only at the end stay apart in a narrow terminal."""
    import os

    paths = [t.rstrip("/") for t in targets]
    if len(paths) < 2:
        return paths, None
    try:
        common = os.path.commonpath([os.path.dirname(p) or "." for p in paths])
    except ValueError:  # absolute and relative paths mixed
        return paths, None
    if common in ("", ".", "/"):
        return paths, None
    return [os.path.relpath(p, common) for p in paths], common


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
    targets: Annotated[list[str], typer.Argument(help="Run directories (RUN@initial / RUN@finetuned pick the expert weights; default: fine-tuned if present), models (alias / folder / hub id), folders of generated images with manifest.jsonl, or .safetensors files of an earlier --save-embeddings.")],
    data: Annotated[Optional[str], typer.Option(help="Data set whose evaluation captions and images are used (default: the first run's, else shapes).")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Root of coco / cc3m.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate the first N captions of the split.")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Comma list of fid,clip,cmmd,pickscore.")] = None,
    fid_features: Annotated[Optional[str], typer.Option(help="FID feature network (see docs); default auto.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default 25).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default: the model's recommended, 7.5 for SD 2.1, 3 for toy).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write results.csv, results.json and the generated images here.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Write into a non-empty --output.")] = False,
    reference: Annotated[Optional[str], typer.Option(help="Target the paired differences are taken against, as given among the targets (default: the first).")] = None,
    save_embeddings: Annotated[bool, typer.Option("--save-embeddings", help="Also write each target's per-image features to OUTPUT/embeddings/NAME.safetensors; such a file is a target of a later eval, scored (and paired) without its images.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json (stdout).")] = "table",
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Generate for the evaluation captions and report FID, CLIP score, CMMD (PickScore), MACs and s/img.

    Each metric comes with its 95% bootstrap interval over the prompts and each target's paired
    difference from --reference with its interval (`--set eval.bootstrap=N` resamples, 0 = off;
    `eval.bootstrap_seed`)."""
    from aptp.evaluate import evaluate as run_eval
    from aptp.evaluate import run_path
    from aptp.io import prepare_output_dir
    from aptp.settings import write_settings

    if fmt not in ("table", "csv", "json"):
        raise AptpUserError(f"--format {fmt}: expected table, csv or json")
    if output is not None and overwrite:
        dest = output.expanduser().resolve()
        for target in targets:
            p = Path(target.rpartition("@")[0] if run_path(target) and not Path(target).exists() else target).expanduser()
            if p.exists() and (p.resolve() == dest or dest in p.resolve().parents):
                raise AptpUserError(f"{target} lies inside --output {output}, which --overwrite empties first; "
                                    "write the results elsewhere")
    if save_embeddings and output is None:
        raise AptpUserError("--save-embeddings writes into --output: give one")
    if reference is not None and reference not in targets:
        raise AptpUserError(f"--reference {reference}: not one of the targets; give it exactly as among the targets")
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
                    on_target=None if quiet else (lambda name: err.print(f"evaluating {name} ...", markup=False)),
                    reference_target=reference,
                    embeddings_dir=out_dir / "embeddings" if out_dir is not None and save_embeddings else None)
    if out_dir is not None:
        write_settings(s, out_dir)
        (out_dir / "results.json").write_text(json.dumps(rows, indent=2))
        with open(out_dir / "results.csv", "w", newline="") as fh:
            _write_csv(fh, rows)
    if fmt == "json":
        out.print_json(json.dumps(rows))
    elif fmt == "csv":
        buf = io.StringIO()
        _write_csv(buf, rows)
        out.file.write(buf.getvalue())
    else:
        tier_cols = [(k, k.replace("clip_", "CLIP ")) for k in rows[0] if k.startswith("clip_") and k != "clip_features"]
        shown = [(k, label) for k, label in COLUMNS + tier_cols if any(r.get(k) is not None for r in rows)]
        boot = rows[0].get("bootstrap")
        deltas = [(k, f"Δ {label}") for k, label in shown if boot and k in boot["metrics"]]
        n = rows[0].get("n_images")
        title = (f"{s.data.name} {s.eval.split}: {n} prompts, images at {s.eval.resolution}px "
                 f"(features: {rows[0].get('clip_features') or rows[0].get('fid_features')})")
        if boot:
            title += (f"\n[lo, hi]: 95% bootstrap interval over prompts ({boot['resamples']} resamples); "
                      f"Δ: paired difference from {boot['reference']}")
        names, common = short_names([r["target"] for r in rows])
        if common is not None:
            title += f"\ntargets under {common}/"
        t = Table(title=escape(title))
        for _, label in shown + deltas:
            if label == "target":
                t.add_column(label, justify="left", overflow="fold")
            else:
                t.add_column(label, justify="right")
        for r, name in zip(rows, names):
            t.add_row(*[escape(name) if k == "target" else _cell(r, k) if k in METRIC_KEYS else _fmt(r.get(k))
                        for k, _ in shown],
                      *[_delta_cell(r, k) for k, _ in deltas])
        out.print(t)
