"""One decomposition refresh for the layers due at a step, and the damping each one is used with.

A layer's decomposition (eigen: ``A = Q_A diag(e_A) Q_A^T``, likewise G; inverse: the damped
inverses of factored Tikhonov damping, Martens & Grosse 2015, sec. 6.3) is recomputed from its
running factors on its clock. ``damping_mode="relative"`` stores with it the scale
``(tr A / dim A)(tr G / dim G)`` of the factors it was made from, so that one damping value means
the same for any loss scale; the absolute damping in use is then ``damping x scale``.

A refresh is collective under DDP (core/kaisa.py: owners decompose and share; a failure
anywhere fails everywhere) and watched (core/refresh.py: float64 retries counted, slow refreshes
reported). A failed layer keeps its previous decomposition with a warning, and raises once it
has failed ``max_decomposition_failures`` times in a row.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, MutableSet, Sequence

import torch

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.damping import DampingControl
from lightning_kfac.core.kaisa import DistributedWork
from lightning_kfac.core.methods import Decomposition
from lightning_kfac.core.refresh import RefreshMonitor


def decompose(block: KFACBlock, damping_control: DampingControl, relative: bool) -> Decomposition:
    """The decomposition of ``block``'s running factors (damped inside when the method needs
    the damping there), with the relative-damping scale when ``relative``."""
    method = block.method
    assert block.A is not None and block.G is not None  # only blocks with factors are due
    damping = damping_control.layer_damping(block) if method.damping_in_decomposition else 0.0
    dec = method.decompose(block.A, block.G, block.a_structure, block.g_structure, damping)
    if relative:
        scale = block.a_structure.mean_eigenvalue(block.A) * block.g_structure.mean_eigenvalue(
            block.G
        )
        dec.damping_scale = torch.tensor(scale, dtype=torch.float64)
    return dec


def effective_damping(block: KFACBlock, multiplier: float) -> float:
    """The absolute damping the block's decomposition in use is applied with: the layer's own
    damping times ``multiplier`` (``lambda_t / lambda_0``), times the decomposition's relative
    scale when it has one."""
    damping = block.damping * multiplier
    dec = block.decomposition
    scale_t = None if dec is None else dec.damping_scale
    scale = 0.0 if scale_t is None else float(scale_t)  # one device sync per layer and step
    return damping * scale if scale > 0 else damping


def update_decompositions(
    due: Sequence[KFACBlock],
    distributed: DistributedWork,
    refresh: RefreshMonitor,
    decompose_block: Callable[[KFACBlock], Decomposition],
    step: int,
    counters: MutableMapping[str, int],
    undecomposed: MutableSet[str],
    max_failures: int,
    warn_once: Callable[[str, str], None],
) -> None:
    """Refresh the decompositions of ``due`` with ``decompose_block``, collectively.

    Counts ``decompositions``, ``decomposition_failures`` and ``decomposition_retries`` in
    ``counters``; a success takes the layer out of ``undecomposed``. A failure keeps the previous
    decomposition and warns once per layer (``warn_once(key, message)``), or raises a
    ``RuntimeError`` naming the layer after ``max_failures`` failures in a row."""
    retries = refresh.retries
    refresh.begin(step, len(due))
    try:
        results = distributed.decompose(due, lambda b: refresh.run(b, decompose_block))
    finally:
        refresh.end()
        counters["decomposition_retries"] += refresh.retries - retries
    for block, err in results:
        if err is None:
            block.failures = 0
            counters["decompositions"] += 1
            undecomposed.discard(block.name)
        else:
            block.failures += 1
            counters["decomposition_failures"] += 1
            if block.failures >= max_failures:
                raise RuntimeError(
                    f"K-FAC: the decomposition of layer {block.name!r} failed "
                    f"{block.failures} times in a row ({err}). Try a larger damping "
                    f"(now {block.damping:g}, e.g. {block.damping * 10:g}) or skip the "
                    "layer with skip_layers."
                ) from err
            warn_once(
                f"decomp:{block.name}",
                f"K-FAC: decomposition of layer {block.name!r} failed ({err}); "
                "keeping the previous one.",
            )
