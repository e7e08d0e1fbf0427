"""Subnormal entries are flushed before factor accumulation and full-path preconditioning.

Once a batch is fit, many output-gradient rows and a fifth of a weight gradient can underflow,
and x86 matmuls on subnormal operands run tens to hundreds of times slower
(``python -m benchmarks.subnormal_rows long``). ``linalg.cast_without_subnormals`` flushes a copy
(the caller's tensor is never written) in ``layers.accumulate_outer`` (``rows^T rows``) and in
``precondition_step.gradient_work`` (the gradient copy the engine preconditions). These tests
check, without timing: no subnormal operand reaches a matmul (recorded by a torch function mode
around the real calls), the caller's tensors are untouched, and the results equal the float64
computation on the unflushed inputs to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import linalg
from lightning_kfac.core.layers import accumulate_outer

TINY = torch.finfo(torch.float32).tiny
EPS = torch.finfo(torch.float32).eps
_MATMULS = {torch.matmul, torch.mm, torch.bmm, Tensor.__matmul__, Tensor.matmul, Tensor.mm}


def _is_subnormal(t: Tensor) -> Tensor:
    mag = t.abs()
    return (mag > 0) & (mag < torch.finfo(t.dtype).tiny)


class _MatmulOperands(TorchFunctionMode):
    """Records every floating operand of the matrix products called under it."""

    def __init__(self) -> None:
        super().__init__()
        self.operands: list[Tensor] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        if func in _MATMULS:
            self.operands += [
                a.detach().clone() for a in args if isinstance(a, Tensor) and a.is_floating_point()
            ]
        return func(*args, **(kwargs or {}))

    def subnormal_operands(self) -> int:
        return sum(int(_is_subnormal(t).any()) for t in self.operands)


def _rows_with_subnormals(seed: int = 0, rows: int = 32, dim: int = 12) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, dim, generator=gen) * 1e-3
    small = torch.randn(rows, dim, generator=gen) * TINY * 1e-2
    out = torch.where(torch.rand(rows, dim, generator=gen) < 0.4, small, normal)
    out[:, 0] = small[:, 0]  # a column of subnormals only
    out[3, 4] = -0.0
    return out


def test_cast_without_subnormals_copies_and_keeps_every_other_entry() -> None:
    x = _rows_with_subnormals()
    x[5, 5], x[6, 6] = float("nan"), float("inf")
    saved = x.clone()
    assert bool(_is_subnormal(x).any())
    for out in (linalg.cast_without_subnormals(x, torch.float32), linalg.without_subnormals(x)):
        assert out.data_ptr() != x.data_ptr() and torch.equal(x.nan_to_num(), saved.nan_to_num())
        assert not bool(_is_subnormal(out).any())
        keep = ~_is_subnormal(x)
        assert torch.equal(out[keep].nan_to_num(), x[keep].nan_to_num())
        assert bool(out[5, 5].isnan()) and float(out[6, 6]) == float("inf")
        assert bool((out[~keep] == 0).all())
    # float64 values that only underflow in float32 are flushed after the cast
    wide = torch.tensor([[1e-40, 1e-3, -2e-39, 0.0]], dtype=torch.float64)
    narrow = linalg.cast_without_subnormals(wide, torch.float32)
    assert narrow.dtype == torch.float32 and narrow.tolist() == [
        [0.0, pytest.approx(1e-3), 0.0, 0.0]
    ]
    # float32 subnormals are normal float64 numbers: nothing to flush when widening
    assert torch.equal(
        linalg.cast_without_subnormals(x, torch.float64).nan_to_num(), x.double().nan_to_num()
    )
    assert bool(torch.signbit(linalg.without_subnormals(x)[3, 4]))  # a -0 stays -0
    clean = torch.randn(4, 3).t()  # no subnormals: the tensor itself, strides and all
    assert linalg.without_subnormals(clean) is clean
    assert linalg.cast_without_subnormals(clean, torch.float32) is clean
    elsewhere = torch.empty(3, device="meta")  # not a CPU tensor: as is, no host sync
    assert linalg.without_subnormals(elsewhere) is elsewhere
    index = torch.tensor([1, 2])  # integer rows pass through
    assert linalg.without_subnormals(index) is index


@pytest.mark.parametrize("diagonal", [False, True])
def test_factor_accumulation_flushes_before_the_product(diagonal: bool) -> None:
    rows = _rows_with_subnormals()
    saved = rows.clone()
    acc = torch.ones(rows.shape[1]) if diagonal else torch.eye(rows.shape[1])
    exact = acc.double() + 4.0 * (
        rows.double().square().sum(0) if diagonal else rows.double().T @ rows.double()
    )
    with _MatmulOperands() as seen:
        out = accumulate_outer(acc.clone(), rows, rows.shape[1], diagonal, torch.float32, 2.0)
    assert torch.equal(rows, saved)  # the captured rows are not written
    if not diagonal:
        assert seen.operands and seen.subnormal_operands() == 0
    magnitude = 4.0 * (
        rows.double().abs().square().sum(0)
        if diagonal
        else rows.double().abs().T @ rows.double().abs()
    )
    bound = (rows.shape[0] + 2) * EPS * (magnitude + acc.double()) + rows.shape[0] * 4.0 * TINY
    assert bool(((out.double() - exact).abs() <= bound).all())


def _spy(monkeypatch: pytest.MonkeyPatch, pre: KFACPreconditioner) -> list[tuple[Any, ...]]:
    """Records ``(grad, dec, damping, P)`` of every call of the blocks' methods' ``precondition``
    (the real one still runs)."""
    calls: list[tuple[Any, ...]] = []
    methods = {id(b.method): b.method for b in pre.blocks.values()}
    for method in methods.values():
        real = method.precondition

        def spy(grad: Tensor, dec: Any, damping: float, *rest: Any, _real: Any = real) -> Tensor:
            out = _real(grad, dec, damping, *rest)
            calls.append((grad.clone(), dec, damping, out.clone()))
            return out

        monkeypatch.setattr(method, "precondition", spy)
    return calls


@pytest.mark.parametrize("method", ["inverse", "eigen"])
def test_full_path_preconditions_a_flushed_copy_of_the_gradient(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 6))
    pre = KFACPreconditioner(
        model,
        compute_method=method,
        low_rank=False,
        kl_clip=None,
        damping=1e-2,
        factor_update_steps=1,
        inv_update_steps=1,
    )
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 10, generator=gen), torch.randn(16, 6, generator=gen)
    for step in range(2):
        model.zero_grad()
        F.mse_loss(model(x), y).backward()  # type: ignore[no-untyped-call]
        raw: dict[int, Tensor] = {}
        if step == 1:  # a gradient that partly underflowed, as after a batch is fit
            for block in pre.blocks.values():
                weight = block.kind.weight
                assert weight.grad is not None
                under = torch.rand(weight.grad.shape, generator=gen) < 0.3
                weight.grad[under] *= TINY * 1e-3  # subnormal, not zero
                assert bool(_is_subnormal(weight.grad).any())
                matrix = block.kind.grad_matrix()
                assert matrix is not None
                raw[id(block)] = matrix.clone()
            calls = _spy(monkeypatch, pre)
            with _MatmulOperands() as seen:
                pre.step()
        else:
            pre.step()
    assert len(calls) == 2 and seen.operands
    assert seen.subnormal_operands() == 0  # no product of the step saw a subnormal operand
    monkeypatch.undo()  # the reference below calls the methods themselves
    blocks = {tuple(b.kind.grad_matrix().shape): b for b in pre.blocks.values()}  # type: ignore[union-attr]
    for grad, dec, damping, out in calls:
        block = blocks[tuple(grad.shape)]
        unflushed = raw[id(block)]
        keep = ~_is_subnormal(unflushed)
        assert not bool(_is_subnormal(grad).any())
        assert torch.equal(grad[keep], unflushed[keep]) and bool((grad[~keep] == 0).all())
        wide = {k: v.double() if v.is_floating_point() else v for k, v in dec.items()}
        exact = block.method.precondition(
            unflushed.double(), wide, damping, block.a_structure, block.g_structure
        )
        tol = 64 * EPS * float(exact.abs().max())
        assert bool(((out.double() - exact).abs() <= tol).all()), method
    pre.remove()
