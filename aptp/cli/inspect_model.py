"""`aptp inspect-model`: units, parameters and MACs of a model (offline for aliases)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.table import Table

from aptp.cli.common import RecipeOpt, SetOpt, command, out, settings_from
from aptp.engine.report import model_report
from aptp.engine.space import build_space
from aptp.errors import AptpUserError
from aptp.models.registry import build_unet, default_resolution, default_text_len, resolve_model, vae_scale_factor


SHORT = {"resnet_channels": "res grp", "self_attn_heads": "self hd", "cross_attn_heads": "cross hd",
         "joint_attn_heads": "joint hd", "ffn_channels": "ffn grp", "depth": "depth"}


class Format(str, Enum):
    table = "table"
    json = "json"


def read_vector(path: Path) -> torch.Tensor:
    """Read an architecture vector from .json (a list, or {"vector": [...]}), .pt or .safetensors."""
    if not path.is_file():
        raise AptpUserError(f"--vector {path}: no such file")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data = data["vector"] if isinstance(data, dict) else data
            return torch.tensor(data, dtype=torch.float32).flatten()
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            return (tensors["vector"] if "vector" in tensors else next(iter(tensors.values()))).float().flatten()
        return torch.as_tensor(torch.load(path, map_location="cpu", weights_only=True)).float().flatten()
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise AptpUserError(f"--vector {path}: could not read an architecture vector ({exc})") from None


@command
def inspect_model(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Alias (sd2.1, sd1.5, sdxl, pixart-alpha, sd3-medium, flux-dev, toy, toy-dit), local diffusers folder or hub id.")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image size in pixels (default: the model's native size).")] = None,
    text_len: Annotated[Optional[int], typer.Option(help="Text tokens seen by cross-attention (default: the model's tokenizer length, 77 for SD).")] = None,
    vector: Annotated[Optional[Path], typer.Option(help="Also report an architecture vector (.json/.pt/.safetensors, length D).")] = None,
    save_space: Annotated[Optional[Path], typer.Option(help="Write the architecture space (unit order) as JSON to this file.")] = None,
    fmt: Annotated[Format, typer.Option("--format", help="table or json.")] = Format.table,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Units per block and kind, parameters and GMACs of a model (conv+linear-only GMACs too)."""
    s = settings_from(recipe, set_, model__name=model)
    ref = resolve_model(s.model.name)
    res = resolution or default_resolution(ref, s.model.local_files_only)
    if res <= 0 or res % 8:
        raise AptpUserError(f"--resolution {res}: must be a positive multiple of 8")
    scale = vae_scale_factor(ref, s.model.local_files_only)
    if res % scale:
        raise AptpUserError(f"--resolution {res}: must be a multiple of the VAE scale factor {scale}")
    if text_len is None:
        text_len = default_text_len(ref)
    if text_len < 1:
        raise AptpUserError(f"--text-len {text_len}: must be >= 1")
    unet = build_unet(ref, local_only=s.model.local_files_only)
    try:
        space = build_space(unet, s.space.ffn_groups, s.space.depth_policy)
    except ValueError as exc:
        raise AptpUserError(str(exc)) from None
    if save_space is not None:
        if save_space.exists():
            raise AptpUserError(f"--save-space {save_space}: file exists; choose another path or remove it")
        space.meta = {"model": s.model.name}
        space.save(save_space)
    vec = None
    if vector is not None:
        vec = read_vector(vector)
        if vec.numel() != space.size:
            raise AptpUserError(f"--vector {vector}: has {vec.numel()} entries, {s.model.name} has {space.size} units")
    report = {"model": s.model.name, "resolution": res, **model_report(unet, space, res // scale, text_len, vec)}
    if fmt is Format.json:
        out.print_json(json.dumps(report))
        return
    t = Table(title=f"{s.model.name} at {res}px (latent {res // scale}), {report['params']:,} parameters")
    t.add_column("block")
    for k in space.kinds:
        t.add_column(SHORT[k], justify="right")
    t.add_column("units", justify="right")
    t.add_column("GMACs", justify="right")
    t.add_column("GMACs c+l", justify="right")
    for row in report["blocks"]:
        t.add_row(row["block"], *[str(row[k]) for k in space.kinds], str(row["units"]),
                  f"{row['gmacs']:.4g}", f"{row['gmacs_conv_linear']:.4g}")
    by_kind = report["units"]["by_kind"]
    t.add_row("total", *[str(by_kind[k]) for k in space.kinds], str(report["units"]["total"]),
              f"{report['gmacs']:.4g}", f"{report['gmacs_conv_linear']:.4g}", style="bold")
    out.print(t)
    ops = report["gmacs_by_op"]
    out.print(f"GMACs by op: conv {ops['conv']:.1f}, linear {ops['linear']:.1f}, attention {ops['attention']:.1f}; "
              f"analytic {report['gmacs_analytic']:.2f} (counted {report['gmacs']:.2f})")
    if "vector" in report:
        v = report["vector"]
        out.print(f"vector: {v['kept_total']}/{space.size} units kept, {v['gmacs']:.2f} GMACs "
                  f"({v['macs_ratio']:.3f} of full; counted {v['gmacs_counted']:.2f}), {v['params']:,} parameters")
    out.print(f"[dim]{report['conventions']}[/dim]")
