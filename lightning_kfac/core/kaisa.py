"""Distributed second-order work (KAISA, Pauloski et al., SC'21): who decomposes, who preconditions.

Under data parallelism every rank holds the same averaged factors, so the d^3 decompositions need
not be repeated on every rank. Each shared layer gets one owner rank
(``assignment.greedy_assignment`` on ``d_A^3 + d_G^3``), which decomposes it. Then
(``KFACConfig.distribute``):

- ``"replicate"``: no sharing, every rank decomposes every layer. Memory: all decompositions on
  every rank; communication: one tiny flag all-reduce per refresh; compute: all of it, everywhere.
- ``"decompositions"`` (KAISA's COMM-OPT, grad_worker_fraction = 1): the owner broadcasts the
  decomposition, every rank keeps all of them and preconditions every layer itself. Memory: as
  replicate; communication: the decompositions once per refresh (eigen: ``d_A^2 + d_A + d_G^2 +
  d_G`` numbers a layer); compute: 1/world of the decompositions.
- ``"gradients"`` (default; KAISA's MEM-OPT, grad_worker_fraction = 1/world): only the owner
  keeps the decomposition and computes the layer's preconditioned gradient, broadcast every step
  (``d_G x d_A`` numbers a layer, like a second gradient all-reduce). Memory: 1/world of the
  decompositions; communication: every step; compute: 1/world of decompositions and of
  preconditioning. Checkpointing (``state_dict``) is then collective: the owners broadcast their
  decompositions so that rank 0 can write them (Lightning calls ``state_dict`` on every rank).

Measured with 2 gloo ranks on the 2-core CPU machine (``python -m benchmarks.communication
--time``), "gradients" has the lowest time per step for the large demo models (it halves both
the decompositions and the per-step preconditioning matmuls; loopback traffic is cheap), so it is
the default; over a slow network, or when preconditioning is cheap (GPUs), "decompositions"
sends far fewer bytes per step.

Decisions are collective: a decomposition that fails on the rank computing it fails on every rank
(a flag all-reduce precedes the transfer), so all ranks keep the same previous decomposition and
count the same failures. A preconditioned gradient travels with an "ok" flag set by its owner.

Layers whose method declares no transfer layout (``Method.layout`` is None: EKFAC, whose scaling
sums stay per rank) and grouped convolutions are always replicated. The layout (which tensors,
their shapes, dtypes and memory order) comes from the method's decomposition type
(core/methods/): a matrix the type declares column-major (produced by LAPACK) is received into a
column-major buffer, so every rank's matmuls see the owner's memory layout. Transfers use one
flattened broadcast per source rank (``transport="broadcast"``) or one all-reduce of zero-filled
buffers (``"all_reduce"``); both deliver the owner's values exactly (x + 0 = x). At 2 ranks here
neither was consistently faster; "broadcast" is the default because an all-reduce moves every rank's
(zero) share too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.core.assignment import greedy_assignment, layer_cost
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.distributed import Communicator, symmetric_numel
from lightning_kfac.core.factors import FactorStructure
from lightning_kfac.core.methods import Decomposition, Layout

TRANSPORTS = ("broadcast", "all_reduce")
#: Decision flags per layer in a factor update (seen, non-finite, ever seen: _update_factors).
FACTOR_FLAGS = 3
#: ``(block, grad, P, lr)``: one layer's work in a step (``KFACPreconditioner._precondition``).
WorkItem = tuple[KFACBlock, Tensor, Tensor | None, float]


def _mode(value: object) -> str:
    return str(getattr(value, "value", value))


def decomposition_layout(block: KFACBlock, relative: bool) -> Layout | None:
    """Keys, shapes, dtypes and memory order of a block's decomposition, or None (not shareable)."""
    if block.a_structure.groups > 1:
        return None  # stacked per-group factors (grouped convolutions): decomposed everywhere
    return block.method.layout(block.a_structure, block.g_structure, block.dtype, relative)


def _wire(t: Tensor, column_major: bool) -> Tensor:
    """The contiguous tensor that travels for ``t`` (its transpose when column-major)."""
    return t.T.contiguous() if column_major else t.contiguous()


def _nbytes(layout: Layout) -> int:
    total = 0
    for _, shape, dtype, _ in layout:
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dtype).element_size()
    return total


class DistributedWork:
    """Per-preconditioner KAISA bookkeeping: the owner map, the transfers, collective decisions.

    Args:
        comm: collectives across ranks (``comm`` may be replaced later: it is read at each call).
        distribute: "replicate", "decompositions" or "gradients" (``KFACConfig.distribute``).
        relative: ``damping_mode="relative"`` (decompositions carry ``damping_scale``).
        blocks: name -> block, the engine's live mapping (layers dropped later leave it).
        transport: "broadcast" (one flattened broadcast per source rank) or "all_reduce".
    """

    def __init__(
        self,
        comm: Communicator,
        distribute: object,
        relative: bool,
        blocks: Mapping[str, KFACBlock],
        transport: str = "broadcast",
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"Invalid transport={transport!r}: must be one of {TRANSPORTS}.")
        self.comm = comm
        self.mode = _mode(distribute)
        self.relative = bool(relative)
        self.blocks = blocks
        self.transport = transport
        self.local_decompositions = 0  # decompositions computed on this rank (for figures/tests)
        self._owners: dict[str, int] = {}
        self._owners_world = 0

    # -- who does what -----------------------------------------------------------------------
    def layout(self, block: KFACBlock) -> Layout | None:
        return decomposition_layout(block, self.relative)

    def is_shared(self, block: KFACBlock) -> bool:
        """True when one owner rank decomposes this block (world > 1, mode != replicate)."""
        return (
            self.comm.world_size > 1 and self.mode != "replicate" and self.layout(block) is not None
        )

    def owners(self) -> dict[str, int]:
        """``{name: rank}`` for the shareable blocks; fixed once computed (per world size)."""
        world = self.comm.world_size
        names = [n for n, b in self.blocks.items() if self.layout(b) is not None]
        if world != self._owners_world or any(n not in self._owners for n in names):
            costs = [
                (n, layer_cost(self.blocks[n].kind.a_dim(), self.blocks[n].kind.g_dim()))
                for n in names
            ]
            self._owners = greedy_assignment(costs, world)
            self._owners_world = world
        return self._owners

    def owner(self, block: KFACBlock) -> int | None:
        """The rank that decomposes ``block``, or None when every rank does."""
        return self.owners()[block.name] if self.is_shared(block) else None

    def communication_bytes(self, world_size: int | None = None) -> dict[str, int]:
        """``communication_bytes`` of these blocks and options (world size: the communicator's)."""
        world = self.comm.world_size if world_size is None else int(world_size)
        return communication_bytes(self.blocks, self.mode, self.relative, world)

    # -- transfers ---------------------------------------------------------------------------
    def _transfer(self, per_src: dict[int, list[Tensor]]) -> None:
        """Make every rank's tensors equal to the source rank's, for each source."""
        if not per_src:
            return
        if self.transport == "broadcast":
            for src in sorted(per_src):
                self.comm.broadcast_(per_src[src], src)
        else:
            rank = self.comm.rank
            everything = []
            for src in sorted(per_src):
                if src != rank:
                    for t in per_src[src]:
                        t.zero_()
                everything += per_src[src]
            self.comm.all_reduce_sum_(everything)

    def _send_decompositions(self, blocks: Sequence[KFACBlock]) -> dict[str, Decomposition]:
        """Owners' decompositions of ``blocks`` on every rank: ``{name: decomposition}`` (the
        layout's fields only, on the owner too, so that every rank applies the same tensors)."""
        rank = self.comm.rank
        per_src: dict[int, list[Tensor]] = {}
        out: dict[str, Decomposition] = {}
        for block in blocks:
            src, layout = self.owners()[block.name], self.layout(block)
            assert layout is not None  # only shareable blocks are sent
            device = block.kind.weight.device
            if src == rank:
                dec = block.decomposition
                _check_layout(block, dec, layout)
                assert dec is not None
                fields = {k: dec[k] for k, _, _, _ in layout}
                wire = [_wire(dec[k], col) for k, _, _, col in layout]
            else:
                fields = {
                    k: (
                        torch.zeros(shape[::-1], dtype=dtype, device=device).T
                        if col
                        else torch.zeros(shape, dtype=dtype, device=device)
                    )
                    for k, shape, dtype, col in layout
                }
                wire = [fields[k].T if col else fields[k] for k, _, _, col in layout]
            out[block.name] = block.method.decomposition_type.from_state(fields)
            per_src.setdefault(src, []).extend(wire)
        self._transfer(per_src)
        return out

    # -- engine entry points -----------------------------------------------------------------
    def decompose(
        self, due: Sequence[KFACBlock], fn: Callable[[KFACBlock], Decomposition]
    ) -> list[tuple[KFACBlock, Exception | None]]:
        """Refresh the decompositions of ``due`` with ``fn(block)``, collectively.

        Returns ``[(block, error or None)]`` in ``due`` order, identical on every rank; on
        success ``block.decomposition`` is set (None on non-owners in "gradients" mode), on
        failure it is left as it was.
        """
        from lightning_kfac.core.linalg import DecompositionError

        comm, rank = self.comm, self.comm.rank
        owners = [self.owner(block) for block in due]
        failed = torch.zeros(len(due), dtype=torch.float64, device=_device(due))  # nccl: on GPU
        local: dict[int, Any] = {}
        for i, (block, src) in enumerate(zip(due, owners)):
            if src is None or src == rank:
                try:
                    local[i] = fn(block)
                    self.local_decompositions += 1
                except DecompositionError as err:
                    local[i] = err
                    failed[i] = 1.0
        if comm.world_size > 1 and len(due):
            comm.all_reduce_sum_([failed])
        results: list[tuple[KFACBlock, Exception | None]] = []
        to_send = []
        for i, (block, src) in enumerate(zip(due, owners)):
            if failed[i] > 0:
                mine = local.get(i)
                if not isinstance(mine, Exception):
                    where = "another rank" if src is None else f"rank {src}"
                    mine = DecompositionError(f"the decomposition failed on {where}")
                results.append((block, mine))
                continue
            if src is None or src == rank:
                block.decomposition = local[i]
            elif self.mode == "gradients":
                block.decomposition = None
            if src is not None and self.mode == "decompositions":
                to_send.append(block)
            results.append((block, None))
        if to_send:
            for name, dec in self._send_decompositions(to_send).items():
                self.blocks[name].decomposition = dec
        return results

    def exchange_gradients(
        self, work: list[WorkItem], lr_of: dict[int, float] | None
    ) -> list[WorkItem]:
        """ "gradients" mode: replace the preconditioned gradients of shared layers by their
        owner's.

        ``work`` holds ``(block, grad, P, lr)`` for the layers this rank could precondition;
        the result holds every layer whose owner produced a P (in ``blocks`` order).
        """
        blocks = [
            b
            for b in self.blocks.values()
            if self.is_shared(b) and (lr_of is None or id(b.kind.weight) in lr_of)
        ]  # this optimizer's
        if self.mode != "gradients" or not blocks:
            return work
        rank = self.comm.rank
        local = {item[0].name: item for item in work}
        per_src: dict[int, list[Tensor]] = {}
        received: dict[str, tuple[Tensor, Tensor]] = {}
        for block in blocks:
            src = self.owners()[block.name]
            device = block.kind.weight.device
            shape = (block.kind.g_dim(), block.kind.a_dim())
            item = local.get(block.name) if src == rank else None
            if item is not None and item[2] is not None:
                pre_grad = item[2].contiguous()
                flag = torch.ones(1, dtype=pre_grad.dtype, device=device)
            else:
                pre_grad = torch.zeros(shape, dtype=block.dtype, device=device)
                flag = torch.zeros(1, dtype=block.dtype, device=device)
            received[block.name] = (pre_grad, flag)
            per_src.setdefault(src, []).extend([pre_grad, flag])
        self._transfer(per_src)
        shared = {b.name for b in blocks}
        out = []
        for block in self.blocks.values():
            if block.name not in shared:
                if block.name in local:
                    out.append(local[block.name])
                continue
            if self.owners()[block.name] != rank:
                block.decomposition = None  # e.g. loaded from a checkpoint: the owner's is used
            pre_grad, flag = received[block.name]
            if float(flag) != 1.0:
                continue
            item = local.get(block.name) or _work_item(block, lr_of)
            if item is not None:
                out.append((block, item[1], pre_grad, item[3]))
        return out

    def complete_state(self, layers: dict[str, dict[str, Any]]) -> None:
        """ "gradients" mode: put the owners' decompositions into every rank's ``state_dict``."""
        blocks = [b for b in self.blocks.values() if self.is_shared(b)]
        if self.mode != "gradients" or not blocks:
            return
        rank = self.comm.rank
        have = torch.tensor(
            [1.0 if self.owners()[b.name] == rank and b.decomposition else 0.0 for b in blocks],
            dtype=torch.float64,
            device=_device(blocks),
        )
        self.comm.all_reduce_sum_([have])
        ready = [b for b, h in zip(blocks, have.tolist()) if h > 0]
        for name, dec in self._send_decompositions(ready).items():
            layers[name]["decomposition"] = {k: v.clone() for k, v in dec.to_state().items()}


def _device(blocks: Sequence[KFACBlock]) -> torch.device:
    """Where collective buffers live (nccl needs CUDA tensors): the first layer's device."""
    return blocks[0].kind.weight.device if len(blocks) else torch.device("cpu")


def _side_numel(structure: FactorStructure) -> int:
    """Numbers sent for one batch estimate: a dense side's upper triangle, a diagonal's entries."""
    return symmetric_numel(structure.dim) if structure.has_basis else structure.dim


def _work_item(block: KFACBlock, lr_of: dict[int, float] | None) -> WorkItem | None:
    weight = block.kind.weight
    if lr_of is not None and id(weight) not in lr_of:
        return None
    raw = block.kind.grad_matrix()
    if raw is None:
        return None
    return (block, raw.to(block.dtype), None, 1.0 if lr_of is None else lr_of[id(weight)])


def _check_layout(block: KFACBlock, dec: Decomposition | None, layout: Layout) -> None:
    for key, shape, dtype, _ in layout:
        value = None if dec is None else dec.get(key)
        if value is None or tuple(value.shape) != tuple(shape) or value.dtype != dtype:
            got = None if value is None else (tuple(value.shape), value.dtype)
            raise RuntimeError(
                f"K-FAC: decomposition of layer {block.name!r} does not match its transfer layout "
                f"({key}: expected {tuple(shape)} {dtype}, got {got}); set distribute='replicate'."
            )


def communication_bytes(
    blocks: Mapping[str, KFACBlock], distribute: object, relative: bool, world_size: int
) -> dict[str, int]:
    """Payload bytes each rank hands to collectives, for every layer due at once.

    Returns a dict with ``factor_update`` (upper triangles of A^, G^ and ``FACTOR_FLAGS`` flags
    a layer),
    ``decomposition_refresh`` (failure flags, plus the decompositions in "decompositions" mode),
    ``per_step`` (the preconditioned gradients in "gradients" mode, else 0), ``state_dict``
    (the collective gather of "gradients" mode) and ``decomposition_memory_per_rank`` (bytes of
    decompositions held by the busiest rank).

    Example:
        >>> KFACPreconditioner(model).distributed.communication_bytes(world_size=2)["factor_update"]
    """
    world = int(world_size)
    mode = _mode(distribute)
    block_list = list(blocks.values())
    layouts = {b.name: decomposition_layout(b, relative) for b in block_list}
    shared = [
        b for b in block_list if world > 1 and mode != "replicate" and layouts[b.name] is not None
    ]
    costs = [(b.name, layer_cost(b.kind.a_dim(), b.kind.g_dim())) for b in shared]
    owner = greedy_assignment(costs, max(world, 1))
    dec_bytes = {name: _nbytes(layout) for name, layout in layouts.items() if layout is not None}

    def elsize(b: KFACBlock) -> int:
        return torch.empty((), dtype=b.dtype).element_size()

    out = {"factor_update": 0, "decomposition_refresh": 0, "per_step": 0, "state_dict": 0}
    if world > 1 and block_list:
        out["factor_update"] = sum(
            (_side_numel(b.a_structure) + _side_numel(b.g_structure) + FACTOR_FLAGS) * elsize(b)
            for b in block_list
        )
        out["decomposition_refresh"] = 8 * len(block_list)
        if mode == "decompositions":
            out["decomposition_refresh"] += sum(dec_bytes[b.name] for b in shared)
        if mode == "gradients":
            out["per_step"] = sum((b.kind.g_dim() * b.kind.a_dim() + 1) * elsize(b) for b in shared)
            out["state_dict"] = 8 * len(shared) + sum(dec_bytes[b.name] for b in shared)
    held = [0] * max(world, 1)
    for b in block_list:
        size = dec_bytes.get(b.name, 0)
        if b in shared and mode == "gradients":
            held[owner[b.name]] += size
        else:
            held = [h + size for h in held]
    out["decomposition_memory_per_rank"] = max(held)
    return out
