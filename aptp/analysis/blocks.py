"""Block-level retained-MAC ratio of each expert (the paper's Figs. 11 and 12).

For every top-level block of the U-Net (``down_blocks.i``, ``mid_block``, ``up_blocks.i``; plus
``other`` = conv_in, time embedding, conv_out) the ratio is::

    ratio_b = MACs of block b in the expert / MACs of block b in the full model

Both come from the analytic MACs model (:mod:`aptp.engine.macs`), so no model is built or run
beyond one forward pass on the meta device. ``MacsModel.block_macs`` gives only the *variable*
MACs of a block (its width units and depth blocks); the fixed part of a block (layers that no
unit owns, e.g. ``proj_in`` / ``proj_out``, skip convolutions, samplers) is the full block's MACs
(:func:`~aptp.engine.macs.macs_by_block`) minus the block's variable MACs at the all-ones vector.
The expert's blocks then sum exactly to its analytic total; :func:`counted_block_macs` measures
the same numbers on a sliced model for the tests.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from aptp.engine.macs import MacsModel, build_macs_model, macs_by_block
from aptp.engine.space import ArchSpace

OTHER = "other"


def block_names(model) -> list[str]:
    """Top-level blocks in execution order, as the model's backbone names them (a U-Net:
    ``down_blocks.0..``, ``mid_block``, ``up_blocks.0..``; a transformer: its blocks)."""
    from aptp.engine.backbones import backbone_for

    return backbone_for(model).block_names(model)


class BlockMacs:
    """Per-block MACs of any hard vector of one space, at one latent size and text length.

    Args:
        unet: the full (unpruned) U-Net; only its config is used.
        space: its architecture space.
        latent_size: latent height/width.
        text_len: text tokens seen by cross-attention.
    """

    def __init__(self, unet: nn.Module, space: ArchSpace, latent_size: int | tuple[int, int], text_len: int):
        self.space = space
        self.blocks = block_names(unet) + [OTHER]
        self.macs: MacsModel = build_macs_model(unet, space, latent_size, text_len)
        self.full = {b: 0.0 for b in self.blocks}
        for b, kinds in macs_by_block(unet, latent_size, text_len).items():
            self.full[b] = sum(kinds.values())
        variable_full = self.macs.block_macs(space, space.full_vector())
        self.fixed = {b: self.full[b] - variable_full.get(b, 0.0) for b in self.blocks}

    def __call__(self, vector: torch.Tensor) -> dict[str, float]:
        """MACs per block (``self.blocks`` order, ``other`` last) of one (D,) hard vector."""
        variable = self.macs.block_macs(self.space, vector)
        unknown = set(variable) - set(self.blocks)
        if unknown:
            raise ValueError(f"space blocks {sorted(unknown)} are not top-level blocks of the U-Net {self.blocks}")
        return {b: self.fixed[b] + variable.get(b, 0.0) for b in self.blocks}

    def table(self, vectors: dict[int, torch.Tensor]) -> pd.DataFrame:
        """Long table, one row per (expert, block): ``expert, block, macs, full_macs, ratio``."""
        rows = []
        for k, v in vectors.items():
            for b, m in self(v).items():
                full = self.full[b]
                rows.append({"expert": int(k), "block": b, "macs": m, "full_macs": full,
                             "ratio": m / full if full > 0 else float("nan")})
        return pd.DataFrame(rows, columns=["expert", "block", "macs", "full_macs", "ratio"])


def counted_block_macs(unet: nn.Module, latent_size: int | tuple[int, int], text_len: int) -> dict[str, float]:
    """MACs per top-level block counted by ``FlopCounterMode`` on a meta copy of ``unet`` (which
    may be a sliced expert). Used to check :class:`BlockMacs`; ``other`` is what no block holds."""
    from torch.utils.flop_counter import FlopCounterMode

    from aptp.engine.macs import _dummy_inputs, _forward, meta_clone

    model = meta_clone(unet)
    sample, t, cond = _dummy_inputs(model, latent_size, text_len)  # the backbone's inputs
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _forward(model, sample, t, cond)
    counts = counter.get_flop_counts()
    blocks = block_names(unet)
    out = {}
    for b in blocks:
        # keys are module paths under the root class name, e.g. "UNet2DConditionModel.down_blocks.0"
        # (FlopCounterMode counts a block and, separately, each module inside it)
        out[b] = sum(sum(ops.values()) for key, ops in counts.items() if key.split(".", 1)[-1] == b) / 2
    out[OTHER] = counter.get_total_flops() / 2 - sum(out.values())
    return out


def expert_block_table(run) -> pd.DataFrame:
    """Block-level retained-MAC ratios of every materialized expert of a run directory.

    Reads each expert's ``plan.json`` (its hard vector, latent size and text length) and base
    ``config.json``; no weights are loaded.

    Args:
        run: a :class:`~aptp.rundir.RunDir` with ``experts.json``.

    Returns:
        The long table of :meth:`BlockMacs.table`, experts in index order, blocks in execution
        order with ``other`` last.
    """
    from aptp.engine.backbones import backbone_for
    from aptp.engine.expert import CONFIG_FILE, read_plan
    from aptp.errors import AptpUserError

    records = run.experts()
    vectors: dict[int, torch.Tensor] = {}
    first = None
    for e in records:
        path = run.path / e["path"]
        if not (path / "plan.json").is_file():
            raise AptpUserError(f"{path}: plan.json is missing; run `aptp materialize {run.path} --overwrite`")
        plan = read_plan(path)
        vectors[int(e["expert"])] = torch.tensor(plan.vector, dtype=torch.float64)
        first = first or (path, plan.meta)
    if not vectors:
        raise AptpUserError(f"{run.experts_json}: lists no experts")
    path, meta = first
    from aptp.rundir import read_json

    config = read_json(Path(path) / CONFIG_FILE)
    unet = backbone_for(config).build(config, "meta")
    if "latent_size" not in meta or "text_len" not in meta:
        raise AptpUserError(f"{path}/plan.json: meta lacks latent_size / text_len; "
                            f"run `aptp materialize {run.path} --overwrite`")
    latent = meta["latent_size"]
    latent = tuple(latent) if isinstance(latent, list) else int(latent)
    return BlockMacs(unet, run.space, latent, int(meta["text_len"])).table(vectors)


def ratio_matrix(blocks: pd.DataFrame, include_other: bool = False) -> pd.DataFrame:
    """The long block table as a matrix: rows experts, columns blocks (execution order)."""
    df = blocks if include_other else blocks[blocks["block"] != OTHER]
    order = list(dict.fromkeys(df["block"]))
    return df.pivot(index="expert", columns="block", values="ratio")[order]
