"""Low-rank preconditioning: use the batch structure of a Linear layer's gradient.

For a Linear layer the weight gradient of one step is a sum of R outer products,
``grad W~ = Gm^T Am`` with ``Am`` (R x d_A) the layer-input rows (a trailing 1 for the bias) and
``Gm`` (R x d_G) the output-gradient rows that autograd delivered (R = rows of all micro-batches).
When R is small compared with the layer width, the preconditioner can work at rank R
(issue 8, "going below the naive bound"):

- inverse: ``P = G_inv grad A_inv = (G_inv Gm^T)(Am A_inv)``: 2R(d_G^2 + d_A^2 + d_G d_A) flops
  instead of 2 d_G d_A (d_G + d_A);
- eigen: ``Q_G^T grad Q_A = (Q_G^T Gm^T)(Am Q_A)`` replaces the first two of the four matmuls.

This is only exact when the gradient really is ``Gm^T Am``: not when the loss adds terms on the
weights (L2 penalties), not after DDP averaging, not with a shared weight used in an order the
rows do not follow. Every use is therefore verified first with Freivalds' check: for a fixed
probe vector v, ``grad v`` must equal ``Gm^T (Am v)`` to rounding (O(d_G d_A) work, far below one
matmul). When the check fails, the full computation runs.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

# Use the low-rank path only when it saves at least this factor of the full path's flops.
MIN_SAVING = 1.5


def _probe(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed, well-spread probe vector (no RNG, so training randomness is untouched)."""
    idx = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    return torch.cos(idx * 2.399963229728653).to(dtype)  # golden-angle sequence


def stack_rows(a_rows: List[Tensor], g_rows: List[Tensor], dtype: torch.dtype) -> Optional[tuple]:
    """``(Am, Gm)`` from the micro-batch row lists, or None when they do not pair up."""
    if not a_rows or len(a_rows) != len(g_rows):
        return None
    if any(a.shape[0] != g.shape[0] for a, g in zip(a_rows, g_rows)):
        return None
    return torch.cat(a_rows).to(dtype), torch.cat(g_rows).to(dtype)


def worthwhile(rows: int, d_a: int, d_g: int, method: str) -> bool:
    """True when the rank-R path needs at least MIN_SAVING times fewer flops."""
    return method in ("eigen", "inverse") and rows <= max_rows(d_a, d_g)


def max_rows(d_a: int, d_g: int) -> int:
    """Largest R for which ``R (d_G^2 + d_A^2 + d_G d_A) * MIN_SAVING <= d_G d_A (d_G + d_A)``.

    The same bound holds for both methods: it compares the two matmuls that form
    ``G_inv grad A_inv`` (or ``Q_G^T grad Q_A``) with their rank-R replacement.
    """
    full = d_g * d_a * (d_g + d_a)
    return int(full // (MIN_SAVING * (d_g * d_g + d_a * d_a + d_g * d_a)))


def gradient_matches(grad: Tensor, am: Tensor, gm: Tensor) -> bool:
    """Freivalds' check that ``grad == gm^T am`` up to rounding in grad's dtype."""
    v = _probe(grad.shape[1], grad.dtype, grad.device)
    lhs = grad @ v
    rhs = gm.T @ (am @ v)
    eps = torch.finfo(grad.dtype).eps
    scale = float((gm.abs().T @ (am.abs() @ v.abs())).max())
    tol = 64.0 * eps * math.sqrt(am.shape[0] + am.shape[1]) * max(scale, 1e-30)
    return bool(torch.isfinite(lhs).all()) and float((lhs - rhs).abs().max()) <= tol


def rotated_gradient(dec: Dict[str, Tensor], am: Tensor, gm: Tensor) -> Tensor:
    """``Q_G^T (Gm^T Am) Q_A`` at rank R (eigen and EKFAC)."""
    return (dec["QG"].T @ gm.T) @ (am @ dec["QA"])


def inverse_product(dec: Dict[str, Tensor], am: Tensor, gm: Tensor) -> Tensor:
    """``G_inv (Gm^T Am) A_inv`` at rank R."""
    return (dec["G_inv"] @ gm.T) @ (am @ dec["A_inv"])
