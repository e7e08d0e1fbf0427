"""Subnormal entries are flushed before factor accumulation.

Once a batch is fit, many output-gradient rows can underflow, and x86 matmuls on subnormal
operands run tens to hundreds of times slower (``python -m benchmarks.subnormal_rows long``).
``linalg.cast_without_subnormals`` flushes a copy (the caller's tensor is never written) in
``layers.accumulate_outer`` (``rows^T rows``). (The gradient copy the engine preconditions is not
flushed: the detection pass cost about 4 ms of a 23 ms MLP step in the common case without
subnormals.) These tests check, without timing: no subnormal operand reaches a matmul
(recorded by a torch function mode around the real calls), the caller's tensors are untouched,
and the results equal the float64 computation on the unflushed inputs to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

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
