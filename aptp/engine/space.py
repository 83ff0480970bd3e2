"""The architecture space: every prunable unit of a diffusers ``UNet2DConditionModel``.

A *unit* is one thing a pruning vector can keep or drop:

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

Only U-Nets made of the standard SD blocks are supported; anything else (another block type, an
inpainting U-Net, class conditioning, a non-GEGLU feed-forward, ...) raises
:class:`UnsupportedUNetError`, a one-line user error naming what is unsupported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from aptp.errors import AptpUserError

KINDS = ("resnet_channels", "self_attn_heads", "cross_attn_heads", "ffn_channels", "depth")
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

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass
class ArchSpace:
    """The ordered list of segments of a U-Net's architecture vector."""

    segments: list[Segment]
    ffn_groups: int = 32
    depth_policy: str = "paper"
    meta: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """D, the length of an architecture vector."""
        return self.segments[-1].stop if self.segments else 0

    def __len__(self) -> int:
        return self.size

    def by_kind(self) -> dict[str, int]:
        """Number of units of each kind, in ``KINDS`` order."""
        counts = {k: 0 for k in KINDS}
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
            "order": (
                "width segments in execution order (down, mid, up; per layer: resnet, then per "
                "transformer block attn1, attn2, ff), then depth segments in execution order"
            ),
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
        )

    def save(self, path: str | Path) -> None:
        from aptp.io import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpace":
        return cls.from_dict(json.loads(Path(path).read_text()))


def iter_layers(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Module | None, bool]]:
    """Yield the U-Net's layers in execution order.

    Yields:
        (block_path, layer_kind, module, up_block_or_none, is_last_of_its_kind) where layer_kind is
        ``"resnet"`` or ``"attention"`` and module is the ResnetBlock2D / Transformer2DModel.
    """
    blocks: list[tuple[str, nn.Module]] = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if getattr(unet, "mid_block", None) is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for path, block in blocks:
        resnets = list(block.resnets)
        attentions = list(getattr(block, "attentions", None) or [])
        if path == "mid_block":
            # mid block runs resnet0, (attn_i, resnet_{i+1})...
            order = [("resnet", 0)]
            for i in range(len(attentions)):
                order += [("attention", i), ("resnet", i + 1)]
        else:
            order = []
            for i in range(len(resnets)):
                order.append(("resnet", i))
                if attentions:
                    order.append(("attention", i))
        for kind, i in order:
            mod = resnets[i] if kind == "resnet" else attentions[i]
            last = i == (len(resnets) - 1 if kind == "resnet" else len(attentions) - 1)
            yield f"{path}.{'resnets' if kind == 'resnet' else 'attentions'}.{i}", kind, mod, path, last


def _is_skippable(path: str, kind: str, module: nn.Module, unet: nn.Module, is_last: bool) -> bool:
    """Depth policy ``paper``: the last ResBlock / transformer of each down or up block, if the
    identity (or, in up blocks, passing the hidden state) has the block's output shape."""
    block = path.split(".resnets")[0].split(".attentions")[0]
    if block == "mid_block" or not is_last:
        return False
    if kind == "attention":
        return True
    if block.startswith("down_blocks"):
        return module.in_channels == module.out_channels
    # up block: the hidden state entering the last resnet is the previous resnet's output
    # (out_channels) unless the block has a single resnet.
    up = unet.get_submodule(block)
    return len(up.resnets) > 1


class UnsupportedUNetError(AptpUserError, ValueError):
    """A U-Net the engine can not gate or slice; the message names what is unsupported."""


DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


def check_unet_config(config, name: str = "the U-Net") -> None:
    """Refuse, before anything is built, a U-Net config the engine can not handle.

    Raises:
        UnsupportedUNetError: one line naming the unsupported part.
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    cls = get("_class_name", "UNet2DConditionModel")
    if cls not in (None, "UNet2DConditionModel"):
        raise UnsupportedUNetError(f"{name}: a {cls} is not supported; aptp prunes UNet2DConditionModel U-Nets "
                                   f"(SD 1.x, SD 2.x, SDXL)")

    def refuse(what: str) -> None:
        raise UnsupportedUNetError(f"{name}: {what} is not supported (aptp prunes the SD 1.x / 2.x / SDXL "
                                   f"text-to-image U-Net layout)")

    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        for t in get(key) or ():
            if t not in allowed:
                refuse(f"{key[:-12]} block type {t!r}")
    if get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
        refuse(f"mid block type {get('mid_block_type')!r}")
    cin, cout = get("in_channels", 4), get("out_channels", 4)
    if cin != cout:
        refuse(f"in_channels={cin} != out_channels={cout} (an inpainting or otherwise extra-input U-Net)")
    if get("addition_embed_type") not in (None, "text_time"):
        refuse(f"addition_embed_type={get('addition_embed_type')!r}")
    if get("class_embed_type") is not None or get("num_class_embeds") is not None:
        refuse("class conditioning (class_embed_type / num_class_embeds)")
    if get("encoder_hid_dim_type") is not None:
        refuse(f"encoder_hid_dim_type={get('encoder_hid_dim_type')!r}")
    if get("dual_cross_attention", False):
        refuse("dual_cross_attention")
    only_cross = get("only_cross_attention", False)
    if only_cross is True or (isinstance(only_cross, (list, tuple)) and any(only_cross)):
        refuse("only_cross_attention")
    if get("attention_type", "default") != "default":
        refuse(f"attention_type={get('attention_type')!r}")


def check_unet(unet: nn.Module) -> None:
    """:func:`check_unet_config` plus the module types the gates and slicers rely on."""
    cfg = getattr(unet, "config", None)
    if cfg is not None:
        check_unet_config(cfg)
    for path, kind, mod, _, _ in iter_layers(unet):
        if kind == "resnet":
            if type(mod).__name__ != "ResnetBlock2D":
                raise UnsupportedUNetError(f"{path}: a {type(mod).__name__} is not supported (ResnetBlock2D only)")
            continue
        if type(mod).__name__ != "Transformer2DModel":
            raise UnsupportedUNetError(f"{path}: a {type(mod).__name__} is not supported (Transformer2DModel only)")
        for t, tb in enumerate(mod.transformer_blocks):
            tpath = f"{path}.transformer_blocks.{t}"
            if type(tb).__name__ != "BasicTransformerBlock":
                raise UnsupportedUNetError(f"{tpath}: a {type(tb).__name__} is not supported (BasicTransformerBlock only)")
            act = type(tb.ff.net[0]).__name__
            if act != "GEGLU":
                raise UnsupportedUNetError(f"{tpath}.ff: a {act} feed-forward is not supported (GEGLU only)")


def build_space(unet: nn.Module, ffn_groups: int = 32, depth_policy: str = "paper") -> ArchSpace:
    """Enumerate the prunable units of a diffusers ``UNet2DConditionModel``.

    Works on a model on any device, including ``meta``. Only the standard SD blocks are
    supported (ResnetBlock2D, Transformer2DModel with BasicTransformerBlock, GEGLU feed-forward).

    Args:
        unet: the U-Net.
        ffn_groups: number of units each transformer block's GEGLU inner width is split into.
        depth_policy: ``paper`` (last ResBlock and last transformer of each down/up block, and
            every inner block of a multi-block transformer) or ``none`` (width only).

    Raises:
        UnsupportedUNetError: a U-Net the engine can not handle.
        ValueError: unknown policy, or a width not divisible into the requested groups.
    """
    if depth_policy not in DEPTH_POLICIES:
        raise ValueError(f"depth_policy must be one of {DEPTH_POLICIES}, got {depth_policy!r}")
    if ffn_groups < 1:
        raise ValueError(f"ffn_groups must be >= 1, got {ffn_groups}")
    check_unet(unet)
    width: list[dict] = []
    depth: list[dict] = []
    for path, kind, mod, block, last in iter_layers(unet):
        depth_idx = -1
        if depth_policy == "paper" and _is_skippable(path, kind, mod, unet, last):
            depth_idx = len(depth)
            depth.append(dict(kind="depth", module=path, size=1, unit_width=1, block=block, parent=-1))
        if kind == "resnet":
            groups = mod.norm2.num_groups
            width.append(
                dict(kind="resnet_channels", module=path, size=groups,
                     unit_width=mod.conv1.out_channels // groups, block=block, depth=depth_idx)
            )
            continue
        nested = depth_policy == "paper" and len(mod.transformer_blocks) > 1
        for t, tb in enumerate(mod.transformer_blocks):
            tpath = f"{path}.transformer_blocks.{t}"
            inner_idx = depth_idx
            if nested:  # each residual BasicTransformerBlock can be skipped on its own
                inner_idx = len(depth)
                depth.append(dict(kind="depth", module=tpath, size=1, unit_width=1, block=block, parent=depth_idx))
            for name, k in (("attn1", "self_attn_heads"), ("attn2", "cross_attn_heads")):
                attn = getattr(tb, name, None)
                if attn is None:
                    continue
                width.append(
                    dict(kind=k, module=f"{tpath}.{name}", size=attn.heads,
                         unit_width=attn.inner_dim // attn.heads, block=block, depth=inner_idx)
                )
            ff_inner = tb.ff.net[2].in_features
            if ff_inner % ffn_groups:
                raise ValueError(
                    f"{tpath}.ff has {ff_inner} inner channels, not divisible into ffn_groups={ffn_groups}"
                )
            width.append(
                dict(kind="ffn_channels", module=f"{tpath}.ff", size=ffn_groups,
                     unit_width=ff_inner // ffn_groups, block=block, depth=inner_idx)
            )
    segments: list[Segment] = []
    offset = 0
    n_width = len(width)
    for w in width:
        d = w.pop("depth")
        segments.append(Segment(offset=offset, depth_segment=(n_width + d) if d >= 0 else -1, **w))
        offset += w["size"]
    for d in depth:
        parent = d.pop("parent")
        segments.append(Segment(offset=offset, depth_segment=(n_width + parent) if parent >= 0 else -1, **d))
        offset += 1
    return ArchSpace(segments=segments, ffn_groups=ffn_groups, depth_policy=depth_policy)
