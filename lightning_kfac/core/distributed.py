"""Communicators: how the engine talks across ranks. No-op locally, torch.distributed under DDP.

The engine only needs sums over ranks (factor averaging, agreeing on skip decisions) and
broadcasts (distributed decompositions, KAISA). ``all_reduce_sum_`` and ``broadcast_`` flatten a
list of tensors into one buffer per dtype, so a factor update costs one collective call, not one
per layer. Every communicator counts the calls it makes and the bytes of the buffers it hands to
torch.distributed (``calls``, ``bytes``: the payload, identical on every rank; the bytes on the
wire depend on the backend's algorithm, e.g. ``2 (w - 1) / w`` times the payload for a ring
all-reduce).

Factor averaging (``all_reduce_factors_``): the batch estimates ``A^``, ``G^`` are symmetric, so
only their upper triangles travel (``d (d + 1) / 2`` of ``d^2`` numbers, ~half the bytes), packed
with ``torch.triu_indices`` into the same buffer as the per-layer decision flags (small integer
counts, exact in float32), and mirrored back after the sum.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


class Communicator:
    """Single-process communicator: every collective is the identity (and counts nothing)."""

    world_size = 1
    rank = 0

    def __init__(self) -> None:
        self.calls: Dict[str, int] = {"all_reduce": 0, "broadcast": 0}
        self.bytes: Dict[str, int] = {"all_reduce": 0, "broadcast": 0}

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over ranks, in place."""

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place."""

    def total_bytes(self) -> int:
        """Payload bytes handed to collectives so far (all-reduce + broadcast)."""
        return sum(getattr(self, "bytes", {}).values())


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
        super().__init__()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("TorchDistributedCommunicator needs an initialized process group")
        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _count(self, kind: str, flat: Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += flat.numel() * flat.element_size()

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        for group, flat in _flatten_by_dtype(tensors):
            self._count("all_reduce", flat)
            self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM, group=self.group)
            _unflatten_(group, flat)

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> None:
        # torch.distributed.broadcast takes a global rank; ``src`` is a rank in ``group``.
        global_src = src if self.group is None else self._dist.get_global_rank(self.group, src)
        for group, flat in _flatten_by_dtype(tensors):
            self._count("broadcast", flat)
            self._dist.broadcast(flat, src=global_src, group=self.group)
            _unflatten_(group, flat)


def default_communicator() -> Communicator:
    """A torch.distributed communicator when a process group with >1 rank exists, else no-op."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistributedCommunicator()
    return Communicator()


# -- factor averaging: upper triangles + flags in one call ----------------------------------------
_TRIU_CACHE: Dict[Tuple[int, torch.device], Tensor] = {}


def _triu(n: int, device: torch.device) -> Tensor:
    key = (n, torch.device(device))
    if key not in _TRIU_CACHE:
        _TRIU_CACHE[key] = torch.triu_indices(n, n, device=device)
    return _TRIU_CACHE[key]


def pack_symmetric(matrix: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix, row by row: d(d+1)/2 values."""
    rows, cols = _triu(matrix.shape[0], matrix.device)
    return matrix[rows, cols]


def unpack_symmetric_(matrix: Tensor, packed: Tensor) -> Tensor:
    """Write ``packed`` (from ``pack_symmetric``) into both triangles of ``matrix``, in place."""
    rows, cols = _triu(matrix.shape[0], matrix.device)
    values = packed.to(matrix.dtype)
    matrix[rows, cols] = values
    matrix[cols, rows] = values
    return matrix


def symmetric_numel(n: int) -> int:
    """Numbers sent for one symmetric n x n matrix."""
    return n * (n + 1) // 2


def all_reduce_factors_(comm: Communicator, flags: Tensor, estimates: Sequence[Tensor]) -> None:
    """Sum ``flags`` and the symmetric ``estimates`` over ranks, in place, in one call per dtype.

    Only upper triangles are sent; afterwards each estimate is the exactly symmetric sum (its
    lower triangle mirrors the summed upper one on every rank). The flags (small integer counts)
    ride in the buffer of the first estimate's dtype, where they are exact (< 2^24 in float32).
    """
    if comm.world_size == 1:
        return
    groups: Dict[Tuple[torch.dtype, torch.device], List[Tensor]] = defaultdict(list)
    for t in estimates:
        groups[(t.dtype, t.device)].append(t)
    if not groups:
        comm.all_reduce_sum_([flags])
        return
    first = True
    for (dtype, device), group in groups.items():
        parts = [flags.to(dtype=dtype, device=device)] if first else []
        parts += [pack_symmetric(t) for t in group]
        flat = torch.cat(parts)
        comm.all_reduce_sum_([flat])
        offset = 0
        if first:
            flags.copy_(flat[:flags.numel()].to(flags.dtype))
            offset = flags.numel()
            first = False
        for t in group:
            n = symmetric_numel(t.shape[0])
            unpack_symmetric_(t, flat[offset:offset + n])
            offset += n

