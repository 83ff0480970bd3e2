"""The architecture space: every prunable unit of a denoiser, in one vector layout.

The units of each backbone family come from its adapter (:mod:`aptp.engine.backbones`); this
module holds what is shared: the segments, the vector layout and ``arch_space.json``. The U-Net
units (SD 1.x / 2.x / SDXL) are:

- ``resnet_channels``: one GroupNorm group of a ResBlock's inner width (conv1 output rows,
  norm2 group, conv2 input columns);
- ``self_attn_heads`` / ``cross_attn_heads``: one attention head of ``attn1`` / ``attn2``;
- ``ffn_channels``: one group of GEGLU inner channels of a transformer block's feed-forward;
- ``depth``: a whole ResBlock or ``Transformer2DModel`` that can be replaced by the identity, and,
  in a ``Transformer2DModel`` holding several ``BasicTransformerBlock``s (SDXL: 2 and 10), each of
  those inner blocks (they are residual, so skipping one is the identity; KOALA / LAPTOP-Diff).
  An inner block inside a skippable ``Transformer2DModel`` is under both gates: its depth
  segment's ``depth_segment`` points at the enclosing one, so gates nest as a chain.

The vector order is stable and documented (docs/architecture-space.md): width segments in
execution order (down blocks, mid block, up blocks; inside a block layer by layer: the ResBlock,
then for each transformer block ``attn1``, ``attn2``, ``ff``), then all depth segments in the same
order (a ``Transformer2DModel``'s own depth unit before its inner blocks'). ``arch_space.json``
stores the segments so any later command can read a vector back.

Diffusion transformers add ``joint_attn_heads`` (an MMDiT head, spanning the image and text streams)
and make every residual transformer block a depth unit; see each adapter.

Only supported layouts are accepted; anything else (another block type, an inpainting U-Net, class
conditioning, ...) raises :class:`UnsupportedModelError` (for U-Nets :class:`UnsupportedUNetError`),
a one-line user error naming what is unsupported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


KINDS = ("resnet_channels", "self_attn_heads", "cross_attn_heads", "ffn_channels", "depth")  # the U-Net's
ALL_KINDS = ("resnet_channels", "self_attn_heads", "cross_attn_heads", "joint_attn_heads", "ffn_channels", "depth")
DEPTH_POLICIES = ("paper", "none")


@dataclass(frozen=True)
class Segment:
    """A contiguous run of units in the architecture vector that belong to one module.

    Attributes:
        kind: one of ``KINDS``.
        module: dotted path of the module the units live in (a ResnetBlock2D, an Attention, a
            FeedForward, or for depth the ResnetBlock2D / Transformer2DModel that is skipped).
        offset: index of the first unit in the vector.
        size: number of units.
        unit_width: channels per unit (GroupNorm group size, head size, FFN group size; 1 for depth).
        block: the top-level block the module lives in (``down_blocks.0``, ``mid_block``, ...).
        depth_segment: index (in ``ArchSpace.segments``) of the innermost depth segment whose block
            contains this module, or -1 when no enclosing block can be skipped. For a depth
            segment: the depth segment enclosing it (an inner transformer block inside a skippable
            ``Transformer2DModel``), or -1.
    """

    kind: str
    module: str
    offset: int
    size: int
    unit_width: int
    block: str
    depth_segment: int = -1
    op: str = ""  # the slicing operation of its plan entries ("" in files older than the adapters)

    @property
    def plan_op(self) -> str:
        if self.op:
            return self.op
        return "skip" if self.kind == "depth" else ("heads" if self.kind.endswith("heads") else self.kind)

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass
class ArchSpace:
    """The ordered list of segments of a model's architecture vector.

    ``kinds`` are the unit kinds of its backbone (reports list them in that order);
    ``meta["backbone"]`` names the adapter that built it.
    """

    segments: list[Segment]
    ffn_groups: int = 32
    depth_policy: str = "paper"
    meta: dict = field(default_factory=dict)
    kinds: tuple[str, ...] = KINDS

    @property
    def size(self) -> int:
        """D, the length of an architecture vector."""
        return self.segments[-1].stop if self.segments else 0

    def __len__(self) -> int:
        return self.size

    def by_kind(self) -> dict[str, int]:
        """Number of units of each kind, in ``kinds`` order."""
        counts = {k: 0 for k in self.kinds}
        for seg in self.segments:
            counts[seg.kind] += seg.size
        return counts

    def kind_index(self, kind: str) -> torch.Tensor:
        """Indices of the vector entries of one kind."""
        idx = [i for s in self.segments if s.kind == kind for i in range(s.offset, s.stop)]
        return torch.tensor(idx, dtype=torch.long)

    def depth_mask(self) -> torch.Tensor:
        """Boolean (D,) mask, True at depth units."""
        m = torch.zeros(self.size, dtype=torch.bool)
        for s in self.segments:
            if s.kind == "depth":
                m[s.offset : s.stop] = True
        return m

    def gate_chain(self, seg: Segment) -> list[int]:
        """Vector indices of the depth units enclosing ``seg``, innermost first (not ``seg`` itself)."""
        chain = []
        i = seg.depth_segment
        while i >= 0:
            chain.append(self.segments[i].offset)
            i = self.segments[i].depth_segment
        return chain

    def is_live(self, seg: Segment, hard: torch.Tensor) -> bool:
        """Whether every depth unit enclosing ``seg`` is kept in the (D,) vector ``hard`` (>= 0.5)."""
        return all(float(hard[i]) >= 0.5 for i in self.gate_chain(seg))

    def check_vector(self, vector: torch.Tensor) -> torch.Tensor:
        """Return ``vector`` as (B, D); raise ValueError naming both sizes if D does not match."""
        if vector.ndim not in (1, 2) or vector.shape[-1] != self.size:
            raise ValueError(
                f"architecture vector has shape {tuple(vector.shape)}, expected ({self.size},) or "
                f"(batch, {self.size}) for this model's space"
            )
        return vector if vector.ndim == 2 else vector.unsqueeze(0)

    def full_vector(self) -> torch.Tensor:
        """The keep-everything vector."""
        return torch.ones(self.size)

    def to_dict(self) -> dict:
        return {
            "format": "aptp.arch_space/1",
            "size": self.size,
            "ffn_groups": self.ffn_groups,
            "depth_policy": self.depth_policy,
            "by_kind": self.by_kind(),
            "kinds": list(self.kinds),
            "order": self.meta.get("order", (
                "width segments in execution order (down, mid, up; per layer: resnet, then per "
                "transformer block attn1, attn2, ff), then depth segments in execution order"
            )),
            "meta": self.meta,
            "segments": [asdict(s) for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpace":
        return cls(
            segments=[Segment(**s) for s in d["segments"]],
            ffn_groups=d.get("ffn_groups", 32),
            depth_policy=d.get("depth_policy", "paper"),
            meta=d.get("meta", {}),
            kinds=tuple(d.get("kinds", KINDS)),
        )

    def save(self, path: str | Path) -> None:
        from aptp.io import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpace":
        return cls.from_dict(json.loads(Path(path).read_text()))


def assemble(width: list[dict], depth: list[dict]) -> list[Segment]:
    """Segments from an adapter's (width, depth) descriptions: width first, then depth, in order."""
    segments: list[Segment] = []
    offset = 0
    n_width = len(width)
    for w in width:
        w = dict(w)
        d = w.pop("depth")
        segments.append(Segment(offset=offset, depth_segment=(n_width + d) if d >= 0 else -1, **w))
        offset += w["size"]
    for d in depth:
        d = dict(d)
        parent = d.pop("parent")
        segments.append(Segment(offset=offset, depth_segment=(n_width + parent) if parent >= 0 else -1, **d))
        offset += 1
    return segments


def build_space(model: nn.Module, ffn_groups: int = 32, depth_policy: str = "paper") -> ArchSpace:
    """Enumerate the prunable units of a diffusers denoiser (any supported backbone).

    Works on a model on any device, including ``meta``.

    Args:
        model: the U-Net or diffusion transformer.
        ffn_groups: number of units each feed-forward's inner width is split into.
        depth_policy: ``paper`` (the backbone's skippable residual blocks; for U-Nets the last
            ResBlock and last transformer of each down/up block and every inner block of a
            multi-block transformer) or ``none`` (width only).

    Raises:
        UnsupportedModelError: a model the engine can not handle.
        ValueError: unknown policy, or a width not divisible into the requested groups.
    """
    from aptp.engine.backbones import backbone_for

    if depth_policy not in DEPTH_POLICIES:
        raise ValueError(f"depth_policy must be one of {DEPTH_POLICIES}, got {depth_policy!r}")
    if ffn_groups < 1:
        raise ValueError(f"ffn_groups must be >= 1, got {ffn_groups}")
    backbone = backbone_for(model)
    backbone.check_model(model)
    width, depth = backbone.segments(model, ffn_groups, depth_policy)
    meta = {"backbone": backbone.name}
    if backbone.name != "unet":
        meta["order"] = "width segments in execution order, then depth segments in execution order"
    return ArchSpace(segments=assemble(width, depth), ffn_groups=ffn_groups, depth_policy=depth_policy,
                     meta=meta, kinds=backbone.kinds)


# the U-Net's checks, re-exported where they always were
from aptp.engine.backbones.base import UnsupportedModelError  # noqa: E402
from aptp.engine.backbones.unet import (  # noqa: E402
    DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS, UnsupportedUNetError, check_unet, check_unet_config, iter_layers)

__all__ = ["ALL_KINDS", "ArchSpace", "DOWN_BLOCKS", "KINDS", "MID_BLOCKS", "Segment", "UP_BLOCKS",
           "UnsupportedModelError", "UnsupportedUNetError", "assemble", "build_space", "check_unet",
           "check_unet_config", "iter_layers"]
