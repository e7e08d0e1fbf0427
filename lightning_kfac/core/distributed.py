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
by dense block copies (``pack_symmetric``) into the same buffer as the per-layer decision flags
(small integer counts, exact in float32), and mirrored back after the sum.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor


class Communicator:
    """Single-process communicator: every collective is the identity (and counts nothing)."""

    world_size = 1
    rank = 0

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"all_reduce": 0, "broadcast": 0}
        self.bytes: dict[str, int] = {"all_reduce": 0, "broadcast": 0}

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over ranks, in place."""

    def broadcast_(self, tensors: Sequence[Tensor], src: int) -> None:
        """Overwrite each tensor with rank ``src``'s copy, in place."""


def _flatten_by_dtype(tensors: Sequence[Tensor]) -> Iterator[tuple[list[Tensor], Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.dtype, t.device)].append(t)
    for group in groups.values():
        if len(group) == 1 and group[0].is_contiguous():
            yield group, group[0].view(-1)  # already one buffer: no copy
        else:
            yield group, torch.cat([t.reshape(-1) for t in group])


def _unflatten_(group: list[Tensor], flat: Tensor) -> None:
    if len(group) == 1 and flat.data_ptr() == group[0].data_ptr():
        return
    offset = 0
    for t in group:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class TorchDistributedCommunicator(Communicator):
    """``torch.distributed`` collectives over ``group`` (the default group when None)."""

    def __init__(self, group: Any = None):
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
def _blocks(n: int) -> tuple[int, int, int]:
    """Split n = k + m (k = n // 2): the packed triangle is an R (rows x m) plus a B (k x m)."""
    k = n // 2
    m = n - k
    return k, m, max(m, k + 1) if k else m


def pack_symmetric(matrix: Tensor, out: Tensor | None = None) -> Tensor:
    """The upper triangle (diagonal included) of a square matrix: d(d+1)/2 values.

    Rectangular full packed layout (LAPACK's RFP idea): with ``M = [[M11, M12], [M21, M22]]``
    (M11 k x k, k = d // 2), ``triu(M22)`` and ``tril(M11^T)`` interlock in one rectangle R and
    ``M12`` follows, so packing is a few dense slice copies instead of an index gather (~5x
    faster than ``M[torch.triu_indices(d, d)]`` for d ~ 1000 on CPU). A 1-D tensor (a diagonal
    factor, nn.Embedding's A) travels as it is. ``out`` (d(d+1)/2 numbers) receives the result.
    """
    if matrix.dim() != 2:  # a diagonal (vector) or a stack of per-group factors travels whole
        return matrix.reshape(-1) if out is None else out.copy_(matrix.reshape(-1))
    n = matrix.shape[0]
    k, m, rows = _blocks(n)
    if out is None:
        out = matrix.new_empty(symmetric_numel(n))
    rect = out[: rows * m].view(rows, m)
    rect.zero_()
    rect[:m].copy_(matrix[k:, k:].triu())
    if k:
        rect[1 : k + 1, :k].add_(matrix[:k, :k].T.tril())
        out[rows * m :].view(k, m).copy_(matrix[:k, k:])
    return out


def unpack_symmetric_(matrix: Tensor, packed: Tensor) -> Tensor:
    """Write ``packed`` (from ``pack_symmetric``) into both triangles of ``matrix``, in place."""
    if matrix.dim() != 2:
        return matrix.copy_(packed.reshape(matrix.shape))
    n = matrix.shape[0]
    k, m, rows = _blocks(n)
    packed = packed.to(matrix.dtype)
    rect = packed[: rows * m].view(rows, m)
    upper = rect[:m].triu()
    matrix[k:, k:] = upper + upper.triu(1).T
    if k:
        lower = rect[1 : k + 1, :k].tril()  # = triu(M11)^T
        matrix[:k, :k] = lower.T + lower.tril(-1)
        top_right = packed[rows * m :].view(k, m)
        matrix[:k, k:] = top_right
        matrix[k:, :k] = top_right.T
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
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in estimates:
        groups[(t.dtype, t.device)].append(t)
    if not groups:
        comm.all_reduce_sum_([flags])
        return
    first = True
    for (dtype, device), group in groups.items():
        sizes = [t.numel() if t.dim() != 2 else symmetric_numel(t.shape[0]) for t in group]
        head = flags.numel() if first else 0
        flat = torch.empty(head + sum(sizes), dtype=dtype, device=device)
        flat[:head] = flags
        offset = head
        for t, n in zip(group, sizes):
            pack_symmetric(t, flat[offset : offset + n])
            offset += n
        comm.all_reduce_sum_([flat])
        offset = 0
        if first:
            flags.copy_(flat[: flags.numel()].to(flags.dtype))
            offset = flags.numel()
            first = False
        for t in group:
            n = t.numel() if t.dim() != 2 else symmetric_numel(t.shape[0])
            unpack_symmetric_(t, flat[offset : offset + n])
            offset += n
