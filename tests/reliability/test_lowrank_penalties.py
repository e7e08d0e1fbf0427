"""The low-rank path against L2 penalties: exact whenever it is used, never drops a real term.

Must hold: with ``low_rank=True`` (the default) the preconditioned gradient equals the
full path's for every gradient term above float rounding. On one fixed K-FAC state (float32, a
batch of R = 6 rows against layers 40 -> 60 -> 50, so the rank-R path is eligible) the loss gets
an L2 penalty ``lam |W|^2`` for lam = 1e-8 ... 1e-2. The penalty's gradient ``2 lam W`` is
compared, entry by entry and in float64, with the worst-case rounding of the float32 gradient
``R eps (|Gm|^T |Am|)`` computed here from the layer's own rows: where any entry of a layer's
term is above it, that layer must take the full path (bit-identical to ``low_rank=False``); and
a 30-step run with lam = 1e-5 must end where the full path ends, not where an unpenalized run
does (the symptom: the penalty was dropped).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner

pytestmark = pytest.mark.reliability

LAMBDAS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
ROWS = 6
LAYERS = ("0", "2")


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 50))


def _x(step: int) -> Tensor:
    return torch.randn(ROWS, 40, generator=torch.Generator().manual_seed(100 + step))


def _loss(model: nn.Module, x: Tensor, lam: float) -> Tensor:
    loss = model(x).pow(2).mean()
    if lam:
        loss = loss + lam * sum(model[int(n)].weight.pow(2).sum() for n in LAYERS)
    return loss


def _state() -> tuple[nn.Module, dict]:
    """Three steps on the full path (factor every step, decompose every 2): a fixed state."""
    model = _model()
    pre = KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=2, damping=1e-3, kl_clip=None, low_rank=False
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        opt.zero_grad()
        _loss(model, _x(t), 0.0).backward()
        pre.step(opt)
        opt.step()
    pre.remove()
    return model, pre.state_dict()


def _precondition(base: nn.Module, state: dict, lam: float, low_rank: bool):
    """One step at t = 3 (no factor update, decompositions from the state): the gradients."""
    model = copy.deepcopy(base)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1000,
        inv_update_steps=1000,
        damping=1e-3,
        kl_clip=None,
        low_rank=low_rank,
    )
    pre.load_state_dict(state)
    rows: dict[str, list[Tensor]] = {}
    hooks = []
    for name in LAYERS:

        def forward_hook(module, args, out, name=name):
            rows[name] = [torch.cat([args[0], torch.ones(ROWS, 1)], 1).detach()]
            out.register_hook(lambda g: rows[name].append(g.detach()))

        hooks.append(model[int(name)].register_forward_hook(forward_hook))
    model.zero_grad()
    _loss(model, _x(3), lam).backward()
    for h in hooks:
        h.remove()
    pre.step()
    pre.remove()
    grads = {
        n: (model[int(n)].weight.grad.clone(), model[int(n)].bias.grad.clone()) for n in LAYERS
    }
    return grads, rows, pre.counters.get("low_rank_steps", 0)


def _above_rounding(base: nn.Module, rows: dict[str, list[Tensor]], lam: float) -> dict[str, bool]:
    """Per layer: does some entry of the penalty's gradient exceed the float32 rounding bound?"""
    eps = torch.finfo(torch.float32).eps
    out = {}
    for name in LAYERS:
        a, g = (t.double() for t in rows[name])
        bound = ROWS * eps * (g.abs().T @ a.abs())  # worst-case rounding of the R-term sums
        term = 2 * lam * base[int(name)].weight.double()
        out[name] = bool((term.abs() > bound[:, :-1]).any())
    return out


def test_penalties_above_rounding_take_the_full_path(reliability_row) -> None:
    base, state = _state()
    _, _, used_plain = _precondition(base, state, 0.0, True)
    assert used_plain == len(LAYERS)  # no penalty: both layers on the rank-R path
    wrong = []
    figures = []
    for lam in LAMBDAS:
        low, rows, used = _precondition(base, state, lam, True)
        full, _, _ = _precondition(base, state, lam, False)
        above = _above_rounding(base, rows, lam)
        for name in LAYERS:
            same = all(torch.equal(p, q) for p, q in zip(low[name], full[name]))
            if above[name] and not same:
                wrong.append((lam, name))
        figures.append(f"{lam:g}:{used}")
    failed = len({lam for lam, _ in wrong})
    reliability_row(
        "low-rank with penalties",
        len(LAMBDAS),
        len(LAMBDAS) - failed,
        "low-rank layers per penalty " + " ".join(figures),
    )
    assert not wrong, f"(penalty, layer) where a term above rounding was dropped: {wrong}"


def test_penalized_run_ends_on_the_full_path(reliability_row) -> None:
    """30 steps with lam = 1e-5: low_rank=True ends within float rounding of low_rank=False, and
    visibly away from the unpenalized run."""

    def run(lam, low_rank):
        model = _model()
        pre = KFACPreconditioner(
            model,
            factor_update_steps=1,
            inv_update_steps=5,
            damping=1e-3,
            kl_clip=None,
            low_rank=low_rank,
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for t in range(30):
            opt.zero_grad()
            _loss(model, _x(t), lam).backward()
            pre.step(opt)
            opt.step()
        pre.remove()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    low, full, plain = run(1e-5, True), run(1e-5, False), run(0.0, True)
    to_full = float((low - full).norm() / full.norm())
    penalty_effect = float((full - plain).norm() / full.norm())
    ok = to_full < 1e-2 * penalty_effect
    reliability_row(
        "low-rank with penalties",
        1,
        int(ok),
        f"30 steps, penalty 1e-5: |low - full| / |penalty effect| {to_full / penalty_effect:.1e}",
    )
    assert ok, (to_full, penalty_effect)
