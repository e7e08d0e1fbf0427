"""One factor update for the layers due at a step (Martens & Grosse 2015, sec. 5).

Each layer's batch estimates ``A^ = E[a a^T]`` and ``G^ = E[g g^T]`` (accumulated by the capture
hooks) enter the running averages ``A <- decay A + (1 - decay) A^`` (likewise G), in this order:

1. per layer: the batch estimates and three flags (this rank saw the layer this step; its
   estimate is non-finite, then sent as zeros; a training forward ever ran it);
2. one all-reduce over ranks of every estimate's upper triangle and the flags together
   (core/distributed.py), so every rank takes the same decisions below;
3. per layer: skipped when no rank saw it (and reported as never run when no rank ever ran it
   and it has no factors: the caller drops it), skipped and reported when any rank's estimate was
   non-finite (the running factors are kept), else the mean over the ranks that saw it enters
   the running average.

EKFAC (George et al. 2018, sec. 3-4) keeps, besides, a running average of its eigenbasis
scaling on the same factor-update steps (``update_ekfac_scaling``).
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping, Sequence

import torch
from torch import Tensor

from lightning_kfac.core.blocks import KFACBlock
from lightning_kfac.core.discovery import Skipped
from lightning_kfac.core.distributed import Communicator, all_reduce_factors_
from lightning_kfac.core.ekfac import EKFACScaling
from lightning_kfac.core.kaisa import FACTOR_FLAGS
from lightning_kfac.core.linalg import all_finite
from lightning_kfac.core.nonfinite import NonfiniteReport
from lightning_kfac.core.trainability import restart_if_reshaped


def update_factors(
    due: Sequence[KFACBlock],
    comm: Communicator,
    factor_decay: float,
    factor_init: str,
    step: int,
    counters: MutableMapping[str, int],
    report: NonfiniteReport,
) -> list[str]:
    """Batch estimates -> all-reduce (one flattened call) -> running averages.

    Counts each running-average update in ``counters["factor_updates"]`` and reports non-finite
    estimates (counter ``"nonfinite_estimates"``). Returns the names of the layers that never ran
    in a training forward on any rank and have no factors (for the caller to drop)."""
    if not due:
        return []
    estimates: list[Tensor] = []
    flags = torch.zeros(FACTOR_FLAGS * len(due), dtype=torch.float64)  # seen, bad, ever seen
    for i, block in enumerate(due):
        f = FACTOR_FLAGS * i
        a_hat, g_hat = block.batch_estimates()
        seen = block.has_estimates()
        finite = seen and all_finite(a_hat, g_hat)
        if seen and not finite:
            a_hat, g_hat = torch.zeros_like(a_hat), torch.zeros_like(g_hat)
        flags[f], flags[f + 1] = float(seen), float(seen and not finite)
        flags[f + 2] = float(block.seen)  # a training forward ever ran (even w/o backward)
        estimates += [a_hat, g_hat]
        block.reset_accumulators()
    all_reduce_factors_(comm, flags, estimates)  # upper triangles + flags, one call
    dropped = []
    for i, block in enumerate(due):
        f = FACTOR_FLAGS * i
        seen_by, bad = int(flags[f]), int(flags[f + 1])  # ranks with estimates / non-finite
        a_hat, g_hat = estimates[2 * i], estimates[2 * i + 1]
        if seen_by == 0:
            if block.A is None and int(flags[f + 2]) == 0:
                dropped.append(block.name)
            continue
        if bad > 0:
            report(
                "nonfinite_estimates",
                f"nonfinite-est:{block.name}",
                f"K-FAC: non-finite factor estimate for layer {block.name!r} at step {step}; "
                "this factor update is skipped (running factors kept).",
            )
            continue
        if seen_by > 1:  # mean over the ranks that ran the layer this step
            a_hat.div_(seen_by)
            g_hat.div_(seen_by)
        restart_if_reshaped(block, a_hat, g_hat)  # a bias changed trainability
        block.update_factors(a_hat, g_hat, factor_decay, factor_init)
        counters["factor_updates"] += 1
    return dropped


def update_ekfac_scaling(
    ekfac: EKFACScaling | None,
    blocks: Iterable[KFACBlock],
    t: int,
    factor_decay: float,
    comm: Communicator,
    report: NonfiniteReport,
) -> None:
    """EKFAC: running average of the eigenbasis scaling on factor-update steps; a non-finite
    estimate is skipped (previous scaling kept) and reported (``"nonfinite_estimates"``)."""
    assert ekfac is not None  # called only with compute_method="ekfac"
    due = [b for b in blocks if t % b.factor_update_steps == 0]
    for name in ekfac.update(due, factor_decay, comm):
        report(
            "nonfinite_estimates",
            f"nonfinite-ekfac:{name}",
            f"K-FAC: non-finite EKFAC scaling estimate for layer {name!r} at step "
            f"{t}; this scaling update is skipped (previous scaling kept).",
        )


def skipped_unseen(block: KFACBlock) -> Skipped:
    """The registration summary's row for a layer dropped because it never ran in training."""
    module = block.kind.module
    n = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
    return Skipped(block.name, type(module).__name__, "never ran in a training forward", n)
