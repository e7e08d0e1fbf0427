"""Engine-level 2-rank runs (torch.distributed, gloo, CPU) shared by tests and benchmarks.

``run_case`` trains a tiny float64 conv + MLP net for ``STEPS`` steps with DDP and a
``KFACPreconditioner`` and returns everything a test compares: parameters, factors, the
decompositions (from ``state_dict``, so "gradients" mode gathers them), counters and the bytes the
communicator sent. ``reference`` is the single-process run on the concatenated batches (the mean
loss over both ranks' examples, which is what DDP's averaged gradient is).

Faults: ``"nan"`` poisons one layer's accumulated ``a a^T`` on rank 1 only at step ``FAULT_STEP``;
``"fail"`` makes that layer's decomposition raise ``DecompositionError`` at step ``FAULT_STEP`` on
``fail_rank`` only (the owner rank, or any rank when replicated).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import linalg

STEPS = 10
BATCH = 4
FAULT_STEP = 3
FAULT_LAYER = "3"
OPTIONS = dict(
    factor_update_steps=1,
    inv_update_steps=3,
    damping=1e-2,
    factor_decay=0.8,
    kl_clip=1e-2,
    damping_mode="absolute",
    factor_init="batch",
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 7), nn.Tanh(), nn.Linear(7, 4)
    ).double()


def batch(step: int, rank: int):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return (
        torch.randn(BATCH, 1, 6, 6, generator=gen, dtype=torch.float64),
        torch.randint(0, 4, (BATCH,), generator=gen),
    )


class FaultyPreconditioner(KFACPreconditioner):
    """Raises ``DecompositionError`` for ``FAULT_LAYER`` at ``FAULT_STEP`` when ``fail`` is set."""

    fail = False

    def _decompose(self, block):
        if self.fail and block.name == FAULT_LAYER and self.steps == FAULT_STEP:
            raise linalg.DecompositionError("injected failure")
        return super()._decompose(block)


def _train(
    model: nn.Module, pre: KFACPreconditioner, data, fault: str | None, poison: bool, fail: bool
) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    pre.optimizer = opt
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if fault == "nan" and poison and step == FAULT_STEP:
            pre.blocks[FAULT_LAYER].a_sum[0, 0] = float("nan")
        pre.fail = fault == "fail" and fail
        pre.step(opt)
        opt.step()


def _snapshot(model: nn.Module, pre: KFACPreconditioner) -> dict[str, Any]:
    state = pre.state_dict()
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "factors": pre.factors(),
        "decompositions": {n: s["decomposition"] for n, s in state["layers"].items()},
        "counters": dict(pre.counters),
        "failures": {n: b.failures for n, b in pre.blocks.items()},
    }


def run_case(mode: str, fault: str | None = None, transport: str = "broadcast") -> dict[str, Any]:
    """One 2-rank run in an initialized process group; returns this rank's snapshot."""
    import torch.distributed as dist

    rank = dist.get_rank()
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    pre = FaultyPreconditioner(ddp, distribute=mode, **OPTIONS)
    pre.distributed.transport = transport
    owner = pre.distributed.owner(pre.blocks[FAULT_LAYER])
    fail_rank = 1 if owner is None else owner
    _train(ddp, pre, lambda t: batch(t, rank), fault, poison=rank == 1, fail=rank == fail_rank)
    sent = dict(pre.comm.bytes)
    out = _snapshot(model, pre)
    out.update(
        sent=sent,
        local_decompositions=pre.distributed.local_decompositions,
        owners=dict(pre.distributed.owners()),
        memory=pre.memory_bytes(),
    )
    return out


def reference(fault: str | None = None) -> dict[str, Any]:
    """Single process on the concatenation of both ranks' batches (same faults, applied once)."""
    model = make_model()
    pre = FaultyPreconditioner(model, **OPTIONS)

    def data(step):
        (x0, y0), (x1, y1) = batch(step, 0), batch(step, 1)
        return torch.cat([x0, x1]), torch.cat([y0, y1])

    _train(model, pre, data, fault, poison=True, fail=True)
    return _snapshot(model, pre)


CASES = [
    ("replicate", None),
    ("decompositions", None),
    ("gradients", None),
    ("decompositions", "nan"),
    ("decompositions", "fail"),
    ("replicate", "fail"),
    ("gradients", "fail"),
]


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Spawn target: run every case in ``CASES`` and save this rank's results."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {f"{mode}:{fault}": run_case(mode, fault) for mode, fault in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still talks (SIGABRT)
    finally:
        dist.destroy_process_group()
