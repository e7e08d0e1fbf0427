"""The engine's fast checks decide exactly as their slow definitions do.

- ``linalg.all_finite`` (one ``aminmax`` pass) against ``torch.isfinite(t).all()``, including
  values whose squares or sums overflow, non-contiguous and empty tensors;
- ``lowrank.gradient_matches`` (formed ``CHECK_BLOCK`` columns at a time) against a float64
  brute-force evaluation of its entrywise criterion ``|grad - gm^T am| <= (R + 2) eps
  |gm|^T |am| + tiny`` on gradients wider than one block, with a perturbation placed in a late
  block at a known multiple of that entry's bound.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_kfac.core import linalg, lowrank


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_all_finite_equals_isfinite(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max
    for case in range(40):
        tensors = [
            torch.randn(7, 9, generator=gen).to(dtype),
            torch.randn(300, generator=gen).to(dtype),
            torch.randn(6, 5, generator=gen).to(dtype).T,
        ]
        which, at = case % 3, case % 5
        kind = case % 4
        row, col = divmod(at, 2)  # an entry of every tensor (the third is a transposed view)
        index = (row, col) if tensors[which].dim() == 2 else (at,)
        if kind == 1:
            tensors[which][index] = float("nan")
        elif kind == 2:
            tensors[which][index] = float("-inf") if case % 2 else float("inf")
        elif kind == 3:  # finite, but its square and any sum overflow
            tensors[which].fill_(big)
        expected = all(bool(torch.isfinite(t).all()) for t in tensors)
        assert linalg.all_finite(*tensors) == expected
    assert linalg.all_finite() and linalg.all_finite(torch.empty(0, 3, dtype=dtype))


def _criterion(grad: Tensor, am: Tensor, gm: Tensor) -> bool:
    """The entrywise definition, in float64, from the same float32 inputs."""
    eps, tiny = torch.finfo(grad.dtype).eps, torch.finfo(grad.dtype).tiny
    g64, a64, m64 = gm.double(), am.double(), grad.double()
    if not bool(torch.isfinite(m64).all()):
        return False
    residual = (m64 - g64.T @ a64).abs()
    bound = (am.shape[0] + 2) * eps * (g64.abs().T @ a64.abs()) + tiny
    return bool((residual <= bound).all())


def _layer(rows: int, d_in: int, d_out: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(grad, am, gm) as a Linear layer's autograd gives them: weight by a
    product, bias by a sum."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=gen)
    g = torch.randn(rows, d_out, generator=gen) * (torch.rand(rows, d_out, generator=gen) < 0.5)
    grad = torch.cat([g.T @ x, g.sum(0, keepdim=True).T], 1)
    return grad, torch.cat([x, torch.ones(rows, 1)], 1), g


@pytest.mark.parametrize("rows,d_in,d_out", [(6, 40, 50), (16, 300, 70), (32, 700, 20)])
def test_gradient_matches_equals_the_entrywise_criterion(rows: int, d_in: int, d_out: int) -> None:
    grad, am, gm = _layer(rows, d_in, d_out, seed=rows)
    assert _criterion(grad, am, gm) and lowrank.gradient_matches(grad, am, gm)
    i, j = d_out // 2, d_in - 3  # an entry in the last block
    bound = (rows + 2) * torch.finfo(torch.float32).eps * float(gm[:, i].abs() @ am[:, j].abs())
    for factor, expected in ((0.25, True), (10.0, False), (1e3, False)):
        edited = grad.clone()
        edited[i, j] += factor * bound
        assert _criterion(edited, am, gm) == expected
        assert lowrank.gradient_matches(edited, am, gm) == expected, factor
    for bad in (float("nan"), float("inf")):
        edited = grad.clone()
        edited[i, j] = bad
        assert not lowrank.gradient_matches(edited, am, gm)


def test_gradient_matches_refuses_a_term_in_every_column() -> None:
    """An L2-like term on every entry: refused (the full path runs)."""
    grad, am, gm = _layer(16, 300, 70, seed=3)
    edited = grad + 1e-3 * grad.abs().max()
    assert not _criterion(edited, am, gm)
    assert not lowrank.gradient_matches(edited, am, gm)
