"""BK-SDM-style block removal in the engine's space (``--method bk-sdm``).

BK-SDM (Kim et al., 2024, "BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion")
removes whole blocks from the U-Net: one ResBlock + transformer pair in every down stage and in
every up stage (its Base model: ``layers_per_block`` 2 → 1), and for its Small model the mid block
as well. Mapped into our space:

* A candidate is a **block pair**: the depth units of one down or up block (its last ResBlock and
  last transformer, which the space can skip). In a down stage that is exactly BK-SDM's second
  pair; in an up stage BK-SDM drops a different one of the three pairs, but like it this removes
  one ResBlock, one transformer and one skip connection per stage. The mid block is not a unit of
  the space, so BK-SDM-Small's mid-block removal has no counterpart here.
* Removing every pair costs more than the usual budgets allow (0.66 of the MACs on SD 2.1's
  topology, which is BK-SDM-Base's own ratio). So pairs are ranked by how much the teacher's output
  changes when that pair alone is skipped (BK-SDM's block-sensitivity analysis, measured here as the
  mean squared output change over ``batches`` batches with timesteps stratified over the schedule),
  and removed least sensitive first while the MACs stay at or above the budget; widths are then
  pruned by weight norm to meet it exactly (:func:`aptp.engine.baselines.block_removal_vector`).

On a diffusion transformer every block is its own depth unit, and the same procedure removes the
least sensitive blocks (the depth pruning of TinyFusion-style baselines) before widths.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from aptp.engine.gates import Gates
from aptp.engine.space import ArchSpace
from aptp.train.distill import per_sample_mse
from aptp.train.taylor import stratified_batches
from aptp.train.teacher import Teacher


def block_pairs(space: ArchSpace) -> tuple[list[str], list[list[int]]]:
    """The removable block pairs: per top-level block, the indices of its outermost depth units
    (those no other depth unit encloses), in the order of the space. Returns (block names, groups)."""
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for seg in space.segments:
        if seg.kind == "depth" and seg.depth_segment < 0:
            groups.setdefault(seg.block, []).extend(range(seg.offset, seg.stop))
    return list(groups), list(groups.values())


@torch.no_grad()
def removal_sensitivity(teacher: Teacher, space: ArchSpace, dataset, groups: list[list[int]], *, batches: int = 8,
                        batch_size: int = 16, seed: int = 0, gates: Gates | None = None) -> torch.Tensor:
    """(G,) mean squared change of the teacher's output when each group of depth units alone is skipped.

    Every group sees the same samples, noise and stratified timesteps; the measure is the squared
    output difference averaged over elements and samples (the output-level distillation loss a
    fine-tuning would start from)."""
    own = gates is None
    gates = gates or Gates(teacher.denoiser, space)
    total = torch.zeros(len(groups), dtype=torch.float64)
    n = 0
    try:
        for x_t, t, text, _ in stratified_batches(teacher, dataset, batches=batches, batch_size=batch_size,
                                                   seed=seed, stream=409):
            with gates.off():
                full = teacher.predict(teacher.denoiser, x_t, t, text)
            for k, group in enumerate(groups):
                v = torch.ones(space.size, device=x_t.device)
                v[group] = 0.0
                with gates.apply(v.expand(x_t.shape[0], -1)):
                    out = teacher.predict(teacher.denoiser, x_t, t, text)
                total[k] += per_sample_mse(out, full).double().sum().cpu()
            n += x_t.shape[0]
    finally:
        if own:
            gates.remove()
    return total / max(n, 1)
