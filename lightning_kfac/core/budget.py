"""The memory budget: fit the predicted K-FAC peak into ``memory_budget_gib``, or refuse.

Each side starts in the structure its size gives (dense up to ``max_dense_dim``, diagonal above:
core/blocks.py). When the predicted peak (core/footprint.py) exceeds the budget, the widest
remaining dense side becomes diagonal, one side at a time, until the prediction fits (the widest
side saves the most: its d^2 terms dominate). When every side is diagonal and the prediction
still exceeds the budget (the preconditioned gradients alone do not fit), the model is refused
with a ``MemoryBudgetError`` naming the largest layers and the options to change. This runs when
the engine is built, before any hook is installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from lightning_kfac.core.factors import DiagonalFactor
from lightning_kfac.core.footprint import footprint, layer_peak_share

if TYPE_CHECKING:
    from lightning_kfac.core.blocks import KFACBlock

GIB = 1024**3


class MemoryBudgetError(ValueError):
    """The model's K-FAC state cannot fit ``memory_budget_gib`` with any factor structure."""


def _gib(n: float) -> str:
    return f"{n / GIB:.3g} GiB"


def _widest_dense_side(blocks: Mapping[str, KFACBlock]) -> tuple[KFACBlock, str] | None:
    best: tuple[KFACBlock, str] | None = None
    best_dim = -1
    for block in blocks.values():
        for side, structure in (("A", block.a_structure), ("G", block.g_structure)):
            if structure.has_basis and structure.dim > best_dim:
                best, best_dim = (block, side), structure.dim
    return best


def apply_memory_budget(blocks: Mapping[str, KFACBlock], budget_gib: float | None) -> list[str]:
    """Make the widest dense sides diagonal until the predicted peak fits ``budget_gib``.

    Returns ``"layer.A"`` / ``"layer.G"`` for every side changed; raises ``MemoryBudgetError``
    when even all-diagonal factors do not fit.
    """
    if budget_gib is None or not blocks:
        return []
    budget = budget_gib * GIB
    changed: list[str] = []
    while footprint(blocks.values()).peak > budget:
        widest = _widest_dense_side(blocks)
        if widest is None:
            break
        block, side = widest
        a, g = block.a_structure, block.g_structure
        if side == "A":
            a = DiagonalFactor(a.dim)
        else:
            g = DiagonalFactor(g.dim)
        block.set_structures(a, g)
        block.structure_reason[side] = "memory budget"
        changed.append(f"{block.name}.{side}")
    peak = footprint(blocks.values()).peak
    if peak > budget:
        largest = sorted(blocks.values(), key=layer_peak_share, reverse=True)[:5]
        names = ", ".join(f"{b.name!r} ({_gib(layer_peak_share(b))})" for b in largest)
        raise MemoryBudgetError(
            f"Invalid memory_budget_gib={budget_gib!r}: K-FAC needs a predicted peak of "
            f"{_gib(peak)} for these {len(blocks)} layers even with every factor side diagonal "
            f"(the preconditioned gradients alone are that large); largest layers: {names}. "
            f"Set memory_budget_gib >= {peak / GIB:.3g} (or None for no budget), or leave the "
            "largest layers out with skip_layers."
        )
    return changed
