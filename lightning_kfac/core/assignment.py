"""Which rank decomposes which layer: greedy longest-processing-time balancing (KAISA).

KAISA (Pauloski et al., SC'21, sec. 4.2) gives each layer's second-order work to one "inverse
worker" and balances the workers by the cost of the decompositions. An eigendecomposition or
inverse of a d x d factor costs ~d^3 flops, so a layer costs ``d_A^3 + d_G^3``. The greedy rule
(Graham's LPT: largest job first, to the least-loaded rank) is within 4/3 of the optimum makespan.

Determinism: every rank must compute the same map without talking, so ties are broken by the
layer's position in the input order (``named_modules`` order, identical on every rank) and by
the lowest rank index; costs are Python integers (no float round-off differences).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def layer_cost(a_dim: int, g_dim: int) -> int:
    """Decomposition cost model of one layer: ``d_A^3 + d_G^3`` (flops up to a constant)."""
    return int(a_dim) ** 3 + int(g_dim) ** 3


def greedy_assignment(costs: Sequence[tuple[str, int]], world_size: int) -> dict[str, int]:
    """Map each name to a rank in ``[0, world_size)``, balancing the summed cost per rank.

    Args:
        costs: ``(name, cost)`` pairs in a rank-independent order (ties keep this order).
        world_size: number of ranks (>= 1).

    Returns:
        ``{name: rank}``; with one rank every layer goes to rank 0.

    Example:
        >>> greedy_assignment([("a", 8), ("b", 5), ("c", 4), ("d", 3)], 2)
        {'a': 0, 'b': 1, 'c': 1, 'd': 0}
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"Invalid world_size={world_size!r}: must be an integer >= 1.")
    order = sorted(range(len(costs)), key=lambda i: (-int(costs[i][1]), i))
    load = [0] * world_size
    owner: dict[str, int] = {}
    for i in order:
        name, cost = costs[i]
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += int(cost)
    return {name: owner[name] for name, _ in costs}


def rank_loads(owner: Mapping[str, int], costs: Mapping[str, int], world_size: int) -> list[int]:
    """Summed cost per rank of an assignment (for summaries and tests)."""
    load = [0] * world_size
    for name, rank in owner.items():
        load[rank] += int(costs[name])
    return load
