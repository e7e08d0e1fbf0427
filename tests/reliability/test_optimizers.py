"""Wrapped optimizers: SGD, SGD+Nesterov, Adam, AdamW, two param groups, an LR scheduler; LBFGS.

Must hold (docs/reliability.md, "wrapped optimizers"): through ``pre.wrap(optimizer)`` training
works (the loss on a teacher-labelled set drops), the inner optimizer receives the KL-clipped
preconditioned gradient with the lr of the param group holding each layer (when the clip is
active ``nu = kl_clip / sum_layers lr^2 <P_clipped, grad>``, docs/conventions.md), its state_dict
keeps the structure of the same optimizer without K-FAC and resumes bit-identically; closure-based
optimizers (LBFGS) are refused with a ValueError naming them, before any hook is installed.
LR schedulers attach to the inner optimizer (``torch.optim.lr_scheduler`` accepts only
``torch.optim.Optimizer``); the engine reads the scheduled lr from it at every step.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac import KFACPreconditioner
from tests.reliability.common import all_finite, mlp

pytestmark = pytest.mark.reliability

KL_CLIP = 1e-3


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 6, generator=gen)
    teacher = torch.randn(6, 3, generator=gen)
    return x, (x @ teacher).argmax(1)


def _groups(model, lrs=(0.1, 0.02)):
    return [
        {"params": [*model.fc0.parameters(), *model.fc1.parameters()], "lr": lrs[0]},
        {"params": list(model.fc2.parameters()), "lr": lrs[1]},
    ]


OPTIMIZERS: dict[str, Callable] = {
    "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "SGD+Nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
    "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2),
    "two param groups": lambda m: torch.optim.SGD(_groups(m), momentum=0.9),
    "LR scheduler": lambda m: torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.5),
}


def _make(name: str):
    model = mlp(seed=1)
    inner = OPTIMIZERS[name](model)
    scheduler = (
        torch.optim.lr_scheduler.StepLR(inner, step_size=10, gamma=0.5)
        if name == "LR scheduler"
        else None
    )
    pre = KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=5, damping=1e-2, kl_clip=KL_CLIP
    )
    return model, inner, scheduler, pre, pre.wrap(inner)


def _train(model, opt, scheduler, start: int, stop: int, on_inner_step=None) -> None:
    x, y = _data()
    for t in range(start, stop):
        idx = torch.arange(32) + 32 * (t % 4)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        if on_inner_step is not None:
            on_inner_step("raw")
        opt.step()
        if scheduler is not None:
            scheduler.step()


def _loss(model) -> float:
    x, y = _data()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _state(model, opt, scheduler) -> dict:
    return {
        "model": model.state_dict(),
        "opt": opt.state_dict(),
        "sched": scheduler.state_dict() if scheduler is not None else {},
    }


def _check_optimizer(name: str) -> list[str]:
    """Run the checks for one optimizer; return the list of what failed."""
    problems: list[str] = []
    model, inner, scheduler, pre, opt = _make(name)
    params = list(model.parameters())
    raw: list[torch.Tensor] = []
    kl_errors: list[float] = []

    def record(_):
        raw[:] = [p.grad.detach().double().clone() for p in params]

    def at_inner_step(optimizer, args, kwargs):  # sees exactly what the inner optimizer uses
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        quad = sum(
            lr_of[id(p)] ** 2 * float((p.grad.double() * r).sum()) for p, r in zip(params, raw)
        )
        nu = pre.last_stats["kl_clip_factor"]
        kl_errors.append(
            abs(nu * quad - KL_CLIP) / KL_CLIP if nu < 1 else max(0.0, quad - KL_CLIP) / KL_CLIP
        )

    inner.register_step_pre_hook(at_inner_step)
    before = _loss(model)
    _train(model, opt, scheduler, 0, 30, on_inner_step=record)
    after = _loss(model)
    if not (all_finite(model.parameters()) and after < 0.8 * before):
        problems.append(f"loss {before:.3f} -> {after:.3f}")
    if max(kl_errors) > 1e-6:
        problems.append(f"KL clip inconsistent with the group lr: {max(kl_errors):.2e}")
    if scheduler is not None and inner.param_groups[0]["lr"] != pytest.approx(0.2 * 0.5**3):
        problems.append(f"scheduled lr {inner.param_groups[0]['lr']}")
    # the inner state_dict keeps the layout of the same optimizer trained without K-FAC
    plain_model = mlp(seed=1)
    plain = OPTIMIZERS[name](plain_model)
    plain_scheduler = (
        torch.optim.lr_scheduler.StepLR(plain, step_size=10, gamma=0.5)
        if scheduler is not None
        else None
    )
    _train(plain_model, plain, plain_scheduler, 0, 2)
    ours, theirs = inner.state_dict(), plain.state_dict()
    layout = {k: sorted(v) for k, v in ours["state"].items()}
    if layout != {k: sorted(v) for k, v in theirs["state"].items()} or [
        sorted(g) for g in ours["param_groups"]
    ] != [sorted(g) for g in theirs["param_groups"]]:
        problems.append("optimizer state_dict layout differs from the plain optimizer's")
    # resume through the wrapper's state_dict (weights_only) is bit-identical
    buffer = io.BytesIO()
    torch.save(_state(model, opt, scheduler), buffer)
    _train(model, opt, scheduler, 30, 35)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, _inner2, scheduler2, _pre2, opt2 = _make(name)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    if scheduler2 is not None:
        scheduler2.load_state_dict(saved["sched"])
    _train(model2, opt2, scheduler2, 30, 35)
    if not all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters())):
        problems.append("resume from the wrapper's state_dict is not bit-identical")
    return problems


def test_wrapped_optimizer_matrix(reliability_row) -> None:
    failures = {name: _check_optimizer(name) for name in OPTIMIZERS}
    failures = {k: v for k, v in failures.items() if v}
    passing = len(OPTIMIZERS) - len(failures)
    reliability_row(
        "wrapped optimizers",
        len(OPTIMIZERS),
        passing,
        f"optimizers passing {passing}/{len(OPTIMIZERS)}",
    )
    assert not failures, failures


def test_lbfgs_refused_clearly(reliability_row) -> None:
    model = mlp()
    lbfgs = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"optimizer=LBFGS.*closure"):
        KFACPreconditioner(model, optimizer=lbfgs)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    assert hooks == 0, "a refused construction left hooks on the model"
    pre = KFACPreconditioner(model)
    with pytest.raises(ValueError, match=r"optimizer=LBFGS"):
        pre.wrap(lbfgs)
    with pytest.raises(ValueError, match=r"optimizer=LBFGS"):
        pre.step(lbfgs)
    wrapped = pre.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"closure"):
        wrapped.step(lambda: 0.0)
    reliability_row("wrapped optimizers", 1, 1, "LBFGS refused with a ValueError naming it")
