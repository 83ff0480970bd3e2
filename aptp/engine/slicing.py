"""Physical slicing: a hard architecture vector becomes a real, smaller stock diffusers model
(a ``UNet2DConditionModel``, ``PixArtTransformer2DModel``, ...).

A vector is first turned into a :class:`SlicePlan` — a replayable list of operations, each naming
a module path and the unit indices it keeps — and the plan is then applied to a model, in place.
Weights are always sliced from the model the plan is applied to (the loaded teacher, or a meta
model that is filled afterwards): nothing is re-initialised.

One slicer per plan operation, each doing the paired out/in operation on the stock diffusers
modules and updating the derived attributes (``heads``, ``inner_dim``, ...): the slicers and
replacement modules are in :mod:`aptp.engine.slicers`, and each backbone adapter dispatches its
operations to them (:meth:`~aptp.engine.backbones.base.Backbone.slice`, ``skip_module``). Layers that lose every unit
are replaced by a tiny module computing exactly what the gated layer computes when all its units
are zero (the output bias), and skipped depth blocks by an identity module (a ResBlock, a
``Transformer2DModel``, or one residual ``BasicTransformerBlock`` inside a multi-block
transformer); those modules are the only classes of ours a sliced U-Net contains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from aptp.engine.slicers import (  # noqa: F401 - the slicer library, re-exported
    ConstantOutput, SkippedResnet, SkippedTransformer, SkippedTransformerBlock, ZeroWidthResnet, _channels, _param,
    _set, _slice_conv, _slice_linear, slice_attention, slice_ffn, slice_resnet)
from aptp.engine.space import ArchSpace


# ---------------------------------------------------------------------------- plan
@dataclass
class SlicePlan:
    """A replayable pruning plan.

    Attributes:
        ops: one dict per pruned module, applied in order:
            ``{"module": path, "op": kind, "keep": [unit indices], "unit_width": int, "units": int}``
            with kind one of ``resnet_channels``, ``heads``, ``ffn_channels``, ``skip``.
        vector: the hard 0/1 vector the plan came from (length D), for the record.
        meta: free-form provenance (base model, space size, MACs, ...).
    """

    ops: list[dict]
    vector: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "aptp.slice_plan/1", "ops": self.ops, "vector": self.vector, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "SlicePlan":
        if d.get("format") != "aptp.slice_plan/1":
            raise ValueError(f"not an aptp slice plan (format={d.get('format')!r})")
        return cls(ops=d["ops"], vector=d.get("vector", []), meta=d.get("meta", {}))


def binarize(vector: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Hard 0/1 vector from a soft one (``>= threshold`` keeps)."""
    return (vector >= threshold).to(torch.float32)


def plan_from_vector(space: ArchSpace, vector: torch.Tensor, threshold: float = 0.5) -> SlicePlan:
    """Turn one architecture vector (D,) into a slicing plan.

    Width units inside a skipped depth block, and depth blocks inside a skipped one, are left out
    of the plan: the block is gone.
    """
    v = space.check_vector(vector.detach().float().cpu())
    if v.shape[0] != 1:
        raise ValueError(f"plan_from_vector takes one vector, got a batch of {v.shape[0]}")
    hard = binarize(v[0], threshold)
    ops: list[dict] = []
    for seg in space.segments:
        if not space.is_live(seg, hard):
            continue  # an enclosing block is skipped
        if seg.kind == "depth":
            if hard[seg.offset] == 0:
                ops.append({"module": seg.module, "op": "skip"})
            continue
        keep = torch.nonzero(hard[seg.offset : seg.stop]).flatten().tolist()
        if len(keep) == seg.size:
            continue
        ops.append({"module": seg.module, "op": seg.plan_op, "keep": keep, "unit_width": seg.unit_width,
                    "units": seg.size})
    return SlicePlan(ops=ops, vector=[int(x) for x in hard.tolist()])


def apply_plan(model: nn.Module, plan: SlicePlan) -> nn.Module:
    """Apply a plan to a model in place and return it (the model's backbone slices each module)."""
    from aptp.engine.backbones import backbone_for

    backbone = backbone_for(model)
    for op in plan.ops:
        path = op["module"]
        mod = model.get_submodule(path)
        new = backbone.skip_module(mod) if op["op"] == "skip" else backbone.slice(mod, op)
        if new is not mod:
            _set(model, path, new)
    return model


def slice_unet(unet: nn.Module, space: ArchSpace, vector: torch.Tensor, *, copy_model: bool = True,
               threshold: float = 0.5) -> tuple[nn.Module, SlicePlan]:
    """Slice ``unet`` by a hard (or binarised) vector.

    Args:
        unet: the teacher. Left untouched when ``copy_model`` (the default).
        space: its architecture space.
        vector: (D,) architecture vector.
        copy_model: slice a deep copy instead of the given module.
        threshold: binarisation threshold for soft vectors.

    Returns:
        (sliced U-Net, plan).
    """
    plan = plan_from_vector(space, vector, threshold)
    target = copy.deepcopy(unet) if copy_model else unet
    return apply_plan(target, plan), plan


slice_model = slice_unet  # the same for every backbone
