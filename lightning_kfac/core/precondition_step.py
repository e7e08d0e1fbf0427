"""What the preconditioning step works on: the layers, their gradients and their ``P``.

``stepped_blocks``: the layers a ``step(optimizer)`` touches (factors, decompositions, ``P``).

For every layer with a decomposition in use, trainable now, whose weight the optimizer steps
(every such layer when there is no optimizer) and that has a gradient: ``grad W~`` in the
block's dtype, its preconditioned ``P = (A (x) G + damping I)^-1 grad W~`` (Martens & Grosse
2015, sec. 6.3 for the damping; the method's own formula) and the learning rate of the param
group holding the weight (for the KL clip, core/kl_clip.py).

``enable_low_rank`` / ``low_rank_rows``: when this step's captured rows reproduce ``grad W~``
exactly, the rank-R path (core/lowrank.py) computes ``P`` from them instead of the full gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping

import torch
from torch import Tensor

from lightning_kfac.core import lowrank
from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.kaisa import WorkItem
from lightning_kfac.core.methods.base import Rows
from lightning_kfac.core.trainability import is_trainable


def learning_rates(optimizer: torch.optim.Optimizer | None) -> dict[int, float] | None:
    """``id(param) -> lr`` of the optimizer's param groups (lr 1 when a group has none), or
    None without an optimizer."""
    if optimizer is None:
        return None
    return {
        id(p): float(group.get("lr", 1.0))
        for group in optimizer.param_groups
        for p in group["params"]
    }


def gradient_work(
    blocks: Iterable[KFACBlock],
    lr_of: dict[int, float] | None,
    precondition: Callable[[KFACBlock, Tensor], Tensor],
) -> list[WorkItem]:
    """``(block, grad, precondition(block, grad), lr)`` for every layer this step preconditions
    (in ``blocks`` order)."""
    work: list[WorkItem] = []
    for block in blocks:
        weight = block.kind.weight
        if (
            not block.decomposition
            or not is_trainable(block)
            or (lr_of is not None and id(weight) not in lr_of)
        ):
            continue
        raw = block.kind.grad_matrix()
        if raw is None:
            continue
        grad = raw.to(block.dtype)
        work.append(
            (block, grad, precondition(block, grad), 1.0 if lr_of is None else lr_of[id(weight)])
        )
    return work


def low_rank_rows(
    block: KFACBlock, grad: Tensor, counters: MutableMapping[str, int]
) -> Rows | None:
    """``(Am, Gm)`` when this step's rows reproduce ``grad`` exactly, else None; each use is
    counted in ``counters["low_rank_steps"]``."""
    if not block.a_rows:
        return None
    pair = lowrank.stack_rows(block.a_rows, block.g_rows, grad.dtype)
    if pair is None or not lowrank.gradient_matches(grad, *pair):
        return None
    counters["low_rank_steps"] = counters.get("low_rank_steps", 0) + 1
    return pair


def stepped_blocks(
    blocks: Iterable[KFACBlock], optimizer: torch.optim.Optimizer | None
) -> list[KFACBlock]:
    """The trainable blocks whose weight ``optimizer`` steps (all trainable ones when there is
    none). Frozen-for-now layers and layers that left the optimizer are not touched.

    With several optimizers (manual optimization) each ``step(opt)`` touches only its own
    layers, so layers of an optimizer that has not run yet are neither updated nor dropped.
    """
    trainable = [b for b in blocks if is_trainable(b)]
    if optimizer is None:
        return trainable
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [b for b in trainable if id(b.kind.weight) in params]


def enable_low_rank(blocks: Iterable[KFACBlock], enabled: bool) -> None:
    """Keep per-step rows of Linear layers where the rank-R path can pay (core/lowrank.py).

    ``enabled``: ``low_rank`` and not under DDP (there the gradient is the average over ranks,
    not the local rows' product).
    """
    if not enabled:
        return
    for block in blocks:
        if (
            block.kind.name == "Linear"
            and block.method.low_rank
            and block.a_structure.has_basis
            and block.g_structure.has_basis
        ):
            block.row_limit = lowrank.max_rows(block.kind.a_dim(), block.kind.g_dim())
