"""Staggered refreshes (``stagger_refresh=True``): no step decomposes every layer.

With the plain clock every layer is decomposed at ``t % M == 0`` (M = ``inv_update_steps``):
on a large CNN one step in M then stalls for the sum of all layers' O(d^3) decompositions
(seconds to minutes on a CPU). Staggering keeps each layer's period M but gives it an offset
``o`` in ``{0, N, 2N, ...} < M`` (N = ``factor_update_steps``: the slots are factor-update
steps, so every refresh decomposes freshly updated factors). The offsets come from a greedy
balance of the layers' costs ``d_A^3 + d_G^3`` (largest first, to the least loaded slot, ties
to the earliest), computed once from the layer sizes, so they are identical on every rank and
after a resume. The first refresh (t = 0) is the plain clock's, of every layer (no layer waits
for a slot to be preconditioned); from the second period on a layer refreshes at
``t = k M + o`` (k >= 1), so each layer keeps its period M after a first period of M + o. A pure
function of t: every rank agrees on it, and a resumed run continues identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from lightning_kfac.core.assignment import layer_cost

if TYPE_CHECKING:
    from lightning_kfac.core.blocks import KFACBlock


def refresh_offsets(
    blocks: Iterable[KFACBlock], factor_update_steps: int, inv_update_steps: int
) -> dict[str, int]:
    """``{name: offset}``: cost-balanced offsets on the factor clock within one refresh period."""
    slots = list(range(0, inv_update_steps, factor_update_steps)) or [0]
    load = {slot: 0 for slot in slots}
    offsets: dict[str, int] = {}
    ordered = sorted(blocks, key=lambda b: -layer_cost(b.kind.a_dim(), b.kind.g_dim()))
    for block in ordered:
        period = block.inv_update_steps
        allowed = [s for s in slots if s < period and s % block.factor_update_steps == 0] or [0]
        slot = min(allowed, key=lambda s: (load.get(s, 0), s))
        offsets[block.name] = slot
        load[slot] = load.get(slot, 0) + layer_cost(block.kind.a_dim(), block.kind.g_dim())
    return offsets


def due(offset: int, inv_update_steps: int, t: int) -> bool:
    """True when a layer with this offset refreshes at step t (all layers at t = 0)."""
    if t < inv_update_steps:
        return t == 0
    return (t - offset) % inv_update_steps == 0
