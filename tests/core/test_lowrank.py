"""The rank-R preconditioning path (core/lowrank.py) equals the full computation, and falls
back to it whenever the gradient is not the product of the step's rows."""

import pytest
import torch
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import lowrank


def _run(low_rank, method, loss_extra=None, steps=3, batch=6, dtype=torch.float64, shared=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 50)).to(dtype)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=2,
        kl_clip=None,
        compute_method=method,
        low_rank=low_rank,
        damping=1e-2,
    )
    grads = []
    for _step in range(steps):
        x = torch.randn(batch, 40, dtype=dtype)
        model.zero_grad()
        h = model[0](x)
        if shared:  # the first layer used twice: rows arrive in reverse order in backward
            h = h + model[0](torch.tanh(x))
        loss = model[2](torch.tanh(h)).pow(2).mean()
        if loss_extra is not None:
            loss = loss + loss_extra(model)
        loss.backward()
        pre.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads, pre.counters.get("low_rank_steps", 0)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_low_rank_equals_full_computation(method):
    low, used = _run(True, method)
    full, unused = _run(False, method)
    assert used == 3 * 2 and unused == 0  # 2 layers x 3 steps, all on the rank-6 path
    for step_low, step_full in zip(low, full):
        for a, b in zip(step_low, step_full):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_l2_term_in_the_loss_falls_back_to_the_full_path():
    extra = lambda m: 1e-3 * m[0].weight.pow(2).sum()  # noqa: E731
    low, used = _run(True, "eigen", loss_extra=extra)
    full, _ = _run(False, "eigen", loss_extra=extra)
    assert used == 3  # only the last layer (its gradient is still Gm^T Am)
    for step_low, step_full in zip(low, full):
        for a, b in zip(step_low, step_full):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_shared_layer_is_exact_either_way():
    low, _ = _run(True, "inverse", shared=True)
    full, _ = _run(False, "inverse", shared=True)
    for step_low, step_full in zip(low, full):
        for a, b in zip(step_low, step_full):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_freivalds_check_detects_a_rank_one_perturbation():
    torch.manual_seed(1)
    am, gm = torch.randn(5, 30, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    grad = gm.T @ am
    assert lowrank.gradient_matches(grad, am, gm)
    grad[3, 7] += 1e-6 * grad.abs().max()
    assert not lowrank.gradient_matches(grad, am, gm)


def test_wide_batches_use_the_full_path():
    # 60 rows against widths 40/60: the rank-R path would cost more, so no rows are kept.
    _, used = _run(True, "eigen", batch=60)
    assert used == 0
    assert lowrank.max_rows(41, 60) < 60
