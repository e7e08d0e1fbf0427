"""The preconditioning step's statistics and KL clip (Ba et al. 2017, sec. 5), then write-back.

Given every layer's ``(block, grad, P, lr)`` of this step (``grad`` the raw weight(+bias) gradient
matrix, ``P`` its preconditioned version, ``lr`` from the optimizer's param group holding the
weight), the update is scaled by

    nu = min(1, sqrt(kl_clip / |sum_layers <P, grad> lr^2|))

(``kl_clip=None``: nu = 1), and ``nu P`` replaces the layer's gradient. A layer whose P is not
finite keeps its raw gradient, is left out of the sum and is reported. The statistics
``kl_clip_factor = nu`` and ``grad_norm_ratio = |nu P| / |grad|`` (over the written layers) are
returned for ``last_stats``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.kaisa import WorkItem
from lightning_kfac.core.nonfinite import NonfiniteReport

#: The statistics of a step that preconditioned nothing (or only warmed up).
NO_CLIP: dict[str, float] = {"kl_clip_factor": 1.0, "grad_norm_ratio": 1.0}


def clip_and_apply(
    work: Sequence[WorkItem], kl_clip: float | None, step: int, report: NonfiniteReport
) -> dict[str, float]:
    """Scale every finite P by the KL clip's nu and write it back as the layer's gradient.

    Reports each layer with a non-finite P (counter ``"nonfinite_gradients"``); returns
    ``{"kl_clip_factor": nu, "grad_norm_ratio": |nu P| / |grad|}``."""
    items: list[tuple[KFACBlock, Tensor, Tensor, float]] = []
    for block, grad, pre, lr in work:
        assert pre is not None  # exchange_gradients keeps only the layers with a P
        items.append((block, grad, pre, lr))
    if not items:
        return dict(NO_CLIP)
    # One host sync for every layer's (<P, grad>, |grad|^2, |P|^2) (a sync per float() would
    # stall a GPU once per layer and statistic). P is finite iff |P|^2 is, except when the
    # squares overflow: only then is P scanned entry by entry (a separate isfinite pass cost
    # as much as the three sums together).
    sums: list[list[float]] = torch.stack(
        [torch.stack([(p * g).sum().double(), _dot(g, g), _dot(p, p)]) for _, g, p, _ in items]
    ).tolist()
    finite = [
        math.isfinite(row[2]) or bool(torch.isfinite(p).all())
        for (_, _, p, _), row in zip(items, sums)
    ]
    vg_sum, raw_sq, pre_sq = 0.0, 0.0, 0.0
    for (_, grad, pre, lr), ok, (vg, _, _) in zip(items, finite, sums):
        if ok:
            if not math.isfinite(vg):  # P * grad overflowed float32: a NaN here disabled the clip
                vg = float((pre.double() * grad.double()).sum())
            vg_sum += vg * lr * lr
    nu = 1.0
    if kl_clip is not None and vg_sum != 0.0:
        nu = min(1.0, math.sqrt(kl_clip / abs(vg_sum)))
    for (block, _, pre, _), ok, (_, g_sq, p_sq) in zip(items, finite, sums):
        if not ok:
            report(
                "nonfinite_gradients",
                f"nonfinite-grad:{block.name}",
                f"K-FAC: non-finite preconditioned gradient for layer {block.name!r} at step "
                f"{step}; the raw gradient is used for this step.",
            )
            continue
        if nu != 1.0:
            pre = pre * nu
        raw_sq += g_sq
        pre_sq += p_sq * nu * nu
        weight_grad = block.kind.weight.grad
        assert weight_grad is not None  # the block's gradient matrix was read from it
        block.kind.set_grad(pre.to(weight_grad.dtype))
    ratio = math.sqrt(pre_sq / raw_sq) if raw_sq > 0 else 1.0
    return {"kl_clip_factor": nu, "grad_norm_ratio": ratio}


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` in float64 (one pass, no temporary; for the norm statistics only)."""
    return torch.dot(x.reshape(-1), y.reshape(-1)).double()
