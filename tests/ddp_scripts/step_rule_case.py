"""``step_rule="quadratic"`` on 2 ranks (gloo, CPU, float64) and its single-process reference.

Each rank holds its own batch; DDP averages the gradients, the rule averages its exact curvature
terms and the two losses of rho over the ranks. The reference is one process on the
concatenation of both batches (mean loss): the same steps and the same damping.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from tests.ddp_scripts.engine_cases import batch, make_model

STEPS = 5
OPTIONS = dict(
    step_rule="quadratic",
    damping=0.1,
    adaptive_damping=True,
    adaptive_damping_interval=2,
    factor_update_steps=1,
    inv_update_steps=1,
    kl_clip=None,
    low_rank=False,
)


def _train(model: nn.Module, wrapped: nn.Module, data) -> dict[str, Any]:
    pre = KFACPreconditioner(wrapped, **OPTIONS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    alphas = []
    for step in range(STEPS):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        pre.step(opt, closure=lambda: F.cross_entropy(model(x), y))
        opt.step()
        alphas.append(pre.step_rule.last["alpha"])
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "damping": pre.damping,
        "alphas": alphas,
    }


def reference() -> dict[str, Any]:
    model = make_model()

    def data(step):
        (x0, y0), (x1, y1) = batch(step, 0), batch(step, 1)
        return torch.cat([x0, x1]), torch.cat([y0, y1])

    return _train(model, model, data)


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = make_model()
        result = _train(model, nn.parallel.DistributedDataParallel(model), lambda t: batch(t, rank))
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
