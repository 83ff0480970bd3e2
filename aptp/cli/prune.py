"""`aptp prune`: train the prompt router and architecture codes under a MACs budget."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from aptp.cli.common import RecipeOpt, SetOpt, command, err, out, settings_from, setup_logging
from aptp.cli.progress import TrainProgress, LogFormat


def default_run_dir(method: str, data: str, budget: float, experts: int) -> Path:
    name = Path(data).name if data not in ("shapes", "coco", "cc3m") else data
    tag = f"{method}-{name}-{budget:g}" + ("" if method in ("uni-arch", "uni-arch-paper") else f"x{experts}")
    return Path("runs") / tag


# `aptp prune --data coco|cc3m` without --model or --recipe means the paper's job on SD 2.1
PAPER_RECIPES = {"coco": "coco-base", "cc3m": "cc3m-base"}


def paper_recipe(data: str | None, model: str | None, recipe: Path | None, overrides: list[str] | None) -> str | None:
    """The shipped paper recipe that ``--data`` implies, or None when the user chose a model or
    recipe (flag, ``APTP_MODEL__NAME`` or ``--set model.name=...``) or another data set."""
    chosen_model = model is not None or "APTP_MODEL__NAME" in os.environ or any(
        o.strip().startswith("model.name=") for o in overrides or ())
    if recipe is not None or chosen_model or data is None:
        return None
    return PAPER_RECIPES.get(data)


@command
def prune(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Teacher: alias (toy, toy-dit, sd2.1, sd1.5, sdxl, pixart-alpha, sd3-medium, flux-dev), diffusers folder or hub id.")] = None,
    data: Annotated[Optional[str], typer.Option(help="shapes | coco | cc3m | PATH to an image folder with metadata.jsonl.")] = None,
    data_root: Annotated[Optional[Path], typer.Option(help="Root folder of coco / cc3m.")] = None,
    budget: Annotated[Optional[float], typer.Option(help="Target MACs as a fraction of the teacher's (0 < b <= 1).")] = None,
    experts: Annotated[Optional[int], typer.Option(help="Number of experts (architecture codes).")] = None,
    method: Annotated[Optional[str], typer.Option(help="aptp (prompt-routed experts), uni-arch (one architecture, warm-started from the router), uni-arch-paper (the paper's Uni-Arch: one architecture's logits trained directly), weight-norm (static L1), taylor (static first-order Taylor, Diff-Pruning) or bk-sdm (static BK-SDM-style block removal, then widths by L1).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (default runs/<method>-<data>-<budget>x<experts>).")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training image size (default: the model's; MACs are counted at space.macs_resolution).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps with codes after warm-up.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Warm-up steps (predictor's own vectors gate the model).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size per process.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Gradient accumulation steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Base AdamW learning rate: x sqrt(global batch) unless --set prune.lr_scaling=none (paper: 2e-4).")] = None,
    prompt_encoder: Annotated[Optional[str], typer.Option(help="Sentence-transformer name or path.")] = None,
    optimal_transport: Annotated[Optional[bool], typer.Option("--optimal-transport/--no-optimal-transport", help="Sinkhorn routing while training. Off (the paper's ablation): nearest code while training and no assignment-consistency loss; contrastive, resource and distillation losses stay on.")] = None,
    distill: Annotated[Optional[bool], typer.Option("--distill/--no-distill", help="Output + block distillation against the teacher while pruning. Off (the paper's ablation): the architecture search trains on the denoising loss alone; fine-tuning still distills (finetune.alpha_distill).")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint of the run directory.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar; only the final summary.")] = False,
    log_format: Annotated[LogFormat, typer.Option(help="text (progress bar) or json (one JSON line per log step on stderr).")] = LogFormat.text,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the prompt router and architecture codes (paper §3.3); write the run directory.

    With --data coco or cc3m and neither --model nor --recipe, the paper's recipe for that data
    set on Stable Diffusion 2.1 is used (recipes/coco-base.yaml, cc3m-base.yaml); flags and --set
    still override it.
    """
    implied = paper_recipe(data, model, recipe, set_)
    if implied is not None:
        recipe = Path(implied)
        err.print(f"--data {data} without --model or --recipe: using the paper recipe {implied} "
                  f"(Stable Diffusion 2.1; pass --model or --recipe to choose otherwise)", markup=False)
    s = settings_from(
        recipe, set_, model__name=model, data__name=data, data__root=data_root, prune__budget=budget,
        router__num_experts=experts, prune__method=method, output=output, data__resolution=resolution,
        prune__steps=steps, prune__warmup_steps=warmup_steps, prune__batch_size=batch_size,
        prune__grad_accum=grad_accum, prune__lr=lr, router__prompt_encoder=prompt_encoder,
        prune__optimal_transport=optimal_transport, prune__distill=distill,
        prune__checkpoint_every=checkpoint_every, prune__seed=seed,
        quiet=quiet or None, log_format=log_format.value if log_format is not LogFormat.text else None,
    )
    if s.output is None:
        s = s.model_copy(update={"output": default_run_dir(s.prune.method, s.data.name, s.prune.budget,
                                                           s.router.num_experts)})
    setup_logging(s.quiet)
    from aptp.train.prune import prune as run_prune

    with TrainProgress("prune", quiet=s.quiet, log_format=s.log_format) as bar:
        result = run_prune(s, overwrite=overwrite, resume=resume, progress=bar.update, log=bar.log)
    if result.interrupted:
        err.print(f"interrupted at step {result.step}; checkpoint written. Continue with: "
                  f"aptp prune --output {result.run_dir} --resume", markup=False)
        raise typer.Exit(130)
    r = result.routing or {}
    if r.get("budget_met") is False:  # on stderr, also with --quiet and --log-format json
        err.print(f"warning: the experts end at {r['mean_macs_ratio']:.3f} of the teacher's MACs on the validation "
                  f"prompts, {r['mean_macs_ratio'] - r['budget']:+.3f} from the budget {r['budget']} (tolerance "
                  f"{r['budget_tolerance']}); prune longer (--steps), raise prune.lambda_res or, for the codes "
                  "alone, prune.code_lr_scale", markup=False)
    summary = {"run_dir": str(result.run_dir), "step": result.step, **r}
    if s.log_format == "json":
        out.print_json(json.dumps(summary))
        return
    shares = ", ".join(f"{x:.1%}" for x in r.get("share_per_expert", []))
    ratios = ", ".join(f"{x:.2f}" for x in r.get("macs_ratio_per_expert", []))
    out.print(f"run directory: {result.run_dir} (step {result.step})", markup=False)
    out.print(f"validation routing of {r.get('prompts', 0)} prompts: mean MACs ratio "
              f"{r.get('mean_macs_ratio', float('nan')):.3f} (budget {r.get('budget')}), "
              f"{r.get('distinct_codes')} distinct of {r.get('num_codes')} codes", markup=False)
    out.print(f"share per expert: {shares}", markup=False)
    out.print(f"MACs ratio per expert: {ratios}", markup=False)
    if r.get("skipped_images"):
        out.print(f"skipped unreadable images: {r['skipped_images']}", markup=False)
