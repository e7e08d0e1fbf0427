"""Communicators: how the engine talks across ranks. No-op locally, torch.distributed under DDP.

The engine only needs sums over ranks (factor averaging, agreeing on skip decisions) and
broadcasts (distributed decompositions). ``all_reduce_sum_`` flattens a list of tensors into one
buffer per dtype, so a factor update costs one collective call, not one per layer.
"""

from __future__ import annotations

from collections import defaultdict
from typing import List, Sequence

import torch
from torch import Tensor


class Communicator:
    """Single-process communicator: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over ranks, in place."""

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place."""


def _flatten_by_dtype(tensors: Sequence[Tensor]):
    groups = defaultdict(list)
    for t in tensors:
        groups[(t.dtype, t.device)].append(t)
    for group in groups.values():
        yield group, torch.cat([t.reshape(-1) for t in group])


def _unflatten_(group: List[Tensor], flat: Tensor) -> None:
    offset = 0
    for t in group:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


class TorchDistributedCommunicator(Communicator):
    """``torch.distributed`` collectives over ``group`` (the default group when None)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributedCommunicator needs an initialized process group")
        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        for group, flat in _flatten_by_dtype(tensors):
            self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM, group=self.group)
            _unflatten_(group, flat)

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> None:
        for group, flat in _flatten_by_dtype(tensors):
            self._dist.broadcast(flat, src=src, group=self.group)
            _unflatten_(group, flat)


def default_communicator() -> Communicator:
    """A torch.distributed communicator when a process group with >1 rank exists, else no-op."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCommunicator()
    return Communicator()
