"""Subnormal entries of the rank-R rows are flushed where they are stacked (``lowrank.stack_rows``).

Once a batch is fit many per-example output gradients underflow, and x86 matmuls on subnormal
operands run tens of times slower (``python -m benchmarks.subnormal_rows micro``). These tests
check, without timing: the stacked rows hold no subnormal entry and every other entry is kept bit
for bit; the exactness check still accepts a gradient formed from the unflushed rows (the flush
moves an entry by less than its absolute allowance) and still refuses a real extra term; and the
rank-R result equals the float64 product of the unflushed rows to the rounding bound.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import lowrank

TINY = torch.finfo(torch.float32).tiny
EPS = torch.finfo(torch.float32).eps


def _is_subnormal(t: Tensor) -> Tensor:
    mag = t.abs()
    return (mag > 0) & (mag < torch.finfo(t.dtype).tiny)


def _rows(seed: int = 0) -> tuple[Tensor, Tensor]:
    """(a, g) in float32: 40 % of g and a few a entries subnormal; g column 0 only subnormal."""
    gen = torch.Generator().manual_seed(seed)
    rows, d_a, d_g = 24, 30, 20
    a = torch.randn(rows, d_a, generator=gen) * 1e3
    a[:, -1] = 1.0  # the bias column
    g = torch.randn(rows, d_g, generator=gen) * 1e-3
    small = torch.randn(rows, d_g, generator=gen) * TINY * 1e-2
    g = torch.where(torch.rand(rows, d_g, generator=gen) < 0.4, small, g)
    g[:, 0] = small[:, 0]  # its gradient row is a sum of subnormal products: about 1e-37, normal
    a[::5, 3] = TINY * 0.5
    return a, g


def test_stacked_rows_hold_no_subnormals_and_keep_every_normal_entry() -> None:
    a, g = _rows()
    a_list, g_list = [a[:10], a[10:]], [g[:10], g[10:]]
    before = [t.clone() for t in a_list + g_list]
    assert bool(_is_subnormal(g).any()) and bool(_is_subnormal(a).any())
    pair = lowrank.stack_rows(a_list, g_list, torch.float32)
    assert pair is not None
    for stacked, raw in zip(pair, (a, g)):
        assert not bool(_is_subnormal(stacked).any())
        keep = ~_is_subnormal(raw)
        assert torch.equal(stacked[keep], raw[keep])
        assert bool((stacked[~keep] == 0).all())
    for t, saved in zip(a_list + g_list, before):  # the kept rows themselves are not touched
        assert torch.equal(t, saved)
    # stacking into float64 has nothing to flush: float32 subnormals are normal float64 numbers
    wide = lowrank.stack_rows(a_list, g_list, torch.float64)
    assert wide is not None and torch.equal(wide[1], g.double())


def test_exactness_check_allows_for_the_flush_and_still_refuses_a_real_term() -> None:
    a, g = _rows()
    grad = g.T @ a  # autograd's product, from the unflushed rows
    assert float(grad[0].abs().max()) > 10 * TINY  # the flush moves row 0 by more than tiny
    pair = lowrank.stack_rows([a], [g], torch.float32)
    assert pair is not None
    assert float((pair[1].T @ pair[0] - grad)[0].abs().max()) > TINY
    assert lowrank.gradient_matches(grad, *pair)
    # a real term is refused: 1e-3 of a normal entry, and 1e-20 on a row of underflowed products
    # (the allowance is about tiny R max|a|, 1e-33 here, not a relative one)
    for i, j, term in ((7, 11, 1e-3 * float(grad[7, 11].abs())), (0, 5, 1e-20)):
        edited = grad.clone()
        edited[i, j] += term
        assert not lowrank.gradient_matches(edited, *pair), (i, j)


def test_rank_r_result_equals_the_float64_product_of_the_unflushed_rows() -> None:
    a, g = _rows()
    gen = torch.Generator().manual_seed(3)
    dec = {
        "QA": torch.linalg.qr(torch.randn(a.shape[1], a.shape[1], generator=gen))[0],
        "QG": torch.linalg.qr(torch.randn(g.shape[1], g.shape[1], generator=gen))[0],
    }
    pair = lowrank.stack_rows([a], [g], torch.float32)
    assert pair is not None
    rotated = lowrank.rotated_gradient(dec, *pair).double()
    qa, qg = dec["QA"].double(), dec["QG"].double()
    exact = qg.T @ (g.double().T @ a.double()) @ qa
    rows, d_a, d_g = a.shape[0], a.shape[1], g.shape[1]
    scale = qg.abs().T @ (g.double().abs().T @ a.double().abs()) @ qa.abs()
    floor = TINY * rows * (float(a.abs().max()) + float(g.abs().max()) + 1.0)
    bound = 2 * (rows + d_a + d_g) * EPS * scale + floor * float(qg.abs().sum(0).max()) * float(
        qa.abs().sum(0).max()
    )
    assert bool(((rotated - exact).abs() <= bound).all())


def _train(low_rank: bool, method: str) -> tuple[list[Tensor], int, float]:
    """Two steps of a float32 MLP where half the examples' output gradients are subnormal."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 50))
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        compute_method=method,
        low_rank=low_rank,
        damping=1e-2,
    )
    gen = torch.Generator().manual_seed(1)
    share = 0.0
    for _ in range(2):
        x = torch.randn(8, 40, generator=gen)
        out = model(x)
        target = torch.randn(4, 50, generator=gen)
        loss = F.mse_loss(out[:4], target) + 1e-40 * out[4:].pow(2).sum()
        model.zero_grad()
        loss.backward()
        kept = model_rows(pre)  # empty on the first step (the row limits are set by it)
        if kept:
            share = max(share, float(_is_subnormal(torch.cat(kept)).float().mean()))
        pre.step()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    steps = pre.counters.get("low_rank_steps", 0)
    pre.remove()
    return grads, steps, share


def model_rows(pre: KFACPreconditioner) -> list[Tensor]:
    return [r.flatten() for b in pre.blocks.values() for r in b.g_rows]


def test_training_with_subnormal_rows_takes_the_rank_r_path_and_matches_the_full_path() -> None:
    for method in ("eigen", "inverse"):
        low, used, share = _train(True, method)
        full, unused, _ = _train(False, method)
        assert share > 0.2  # the case under test: many kept rows subnormal
        assert used == 2 * 2 and unused == 0  # both layers, both steps on the rank-R path
        for x, y in zip(low, full):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6 * float(y.abs().max())), method
