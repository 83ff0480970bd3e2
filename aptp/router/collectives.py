"""The two collectives the router needs: a SUM all-reduce and an all-gather of variable batches.

The router's functions take plain callables (``all_reduce=``, ``all_gather=``) so tests can
simulate several processes without a process group. These classes bundle them with the rank:

    comm = default_collective()            # TorchCollective under torchrun / accelerate, else Local
    q = sinkhorn(scores, all_reduce=comm.all_reduce)
    loss = contrastive_loss(z, e_soft, all_gather=comm.all_gather, rank=comm.rank)
"""

from __future__ import annotations

import torch

__all__ = ["Collective", "LocalCollective", "TorchCollective", "default_collective"]


class Collective:
    """Interface: ``rank``, ``world_size``, ``all_reduce`` (SUM) and ``all_gather`` (list per rank)."""

    rank: int = 0
    world_size: int = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """SUM of ``tensor`` over processes (same shape everywhere); returns a new tensor."""
        raise NotImplementedError

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` in rank order. Sizes along dim 0 may differ; other dims
        must match. The results carry no gradient."""
        raise NotImplementedError


class LocalCollective(Collective):
    """One process: ``all_reduce`` is the identity, ``all_gather`` returns ``[tensor]``."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return [tensor]


class TorchCollective(Collective):
    """``torch.distributed`` collectives (gloo on CPU, NCCL on GPUs) over ``group``.

    Args:
        group: process group; ``None`` = the default (world) group, which must be initialised.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchCollective needs an initialised torch.distributed process group")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        dist = self._dist
        t = tensor.detach().contiguous()
        # sizes first, so processes may hold different batch sizes (last, uneven batch)
        size = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s) for s in sizes]
        longest = max(counts)
        if t.shape[0] < longest:
            pad = t.new_zeros((longest - t.shape[0], *t.shape[1:]))
            t = torch.cat([t, pad])
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        return [p[:n] for p, n in zip(parts, counts)]


def default_collective() -> Collective:
    """:class:`TorchCollective` when a process group with more than one process is running,
    else :class:`LocalCollective`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollective()
    return LocalCollective()
