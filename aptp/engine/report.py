"""A model's architecture report: units per block and kind, parameters and MACs (`inspect-model`)."""

from __future__ import annotations

import torch
from torch import nn

from aptp.engine.macs import build_macs_model, count_macs, macs_by_block, meta_clone
from aptp.engine.slicing import apply_plan, plan_from_vector
from aptp.engine.space import ArchSpace

CONVENTIONS = (
    "MACs = FLOPs/2 of one denoiser (U-Net or transformer) forward at batch 1, counting convolutions, linear layers and "
    "attention matmuls (cross-attention keys = text length); norms and element-wise ops excluded. "
    "gmacs_conv_linear leaves the attention matmuls out (the BK-SDM / thop convention). The APTP "
    "paper's 1,384.2 G for SD 2.1 charges cross-attention keys the query length; we do not."
)


def _count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def model_report(unet: nn.Module, space: ArchSpace, latent_size: int, text_len: int = 77,
                 vector: torch.Tensor | None = None) -> dict:
    """Describe a denoiser, U-Net or transformer (any device; all work is done on meta copies).

    Args:
        unet: the full model.
        space: its architecture space.
        latent_size: latent height = width.
        text_len: text tokens.
        vector: optional (D,) architecture vector; adds its MACs, ratio, kept units and parameters.
    """
    by_op = count_macs(unet, latent_size, text_len, by_op=True)
    blocks = macs_by_block(unet, latent_size, text_len)
    units_by_block: dict[str, dict[str, int]] = {}
    for seg in space.segments:
        units_by_block.setdefault(seg.block, {k: 0 for k in space.kinds})[seg.kind] += seg.size
    block_rows = []
    for name, ops in sorted(blocks.items(), key=lambda kv: kv[0] == "other"):
        row = {"block": name, **units_by_block.get(name, {k: 0 for k in space.kinds})}
        row["units"] = sum(units_by_block.get(name, {}).values())
        row["gmacs"] = sum(ops.values()) / 1e9
        row["gmacs_conv_linear"] = (ops["conv"] + ops["linear"]) / 1e9
        block_rows.append(row)
    macs = build_macs_model(unet, space, latent_size, text_len)
    report = {
        "params": _count_params(unet),
        "latent_size": latent_size,
        "text_len": text_len,
        "gmacs": by_op["total"] / 1e9,
        "gmacs_analytic": macs.full / 1e9,  # the analytic model budgets use; equals the count
        "gmacs_conv_linear": (by_op["conv"] + by_op["linear"]) / 1e9,
        "gmacs_by_op": {k: by_op[k] / 1e9 for k in ("conv", "linear", "attention")},
        "units": {"total": space.size, "by_kind": space.by_kind()},
        "blocks": block_rows,
        "conventions": CONVENTIONS,
    }
    if vector is not None:
        v = space.check_vector(vector.float())[0]
        hard = (v >= 0.5).float()
        sliced = apply_plan(meta_clone(unet), plan_from_vector(space, hard))
        kept = {k: int(hard[space.kind_index(k)].sum()) for k in space.kinds}
        report["vector"] = {
            "gmacs": float(macs(hard)[0]) / 1e9,
            "gmacs_counted": count_macs(sliced, latent_size, text_len) / 1e9,
            "macs_ratio": float(macs.ratio(hard)[0]),
            "params": _count_params(sliced),
            "kept_by_kind": kept,
            "kept_total": int(hard.sum()),
        }
    return report
