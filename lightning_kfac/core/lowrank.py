"""Low-rank preconditioning: use the batch structure of a Linear layer's gradient.

For a Linear layer the weight gradient of one step is a sum of R outer products,
``grad W~ = Gm^T Am`` with ``Am`` (R x d_A) the layer-input rows (a trailing 1 for the bias) and
``Gm`` (R x d_G) the output-gradient rows that autograd delivered (R = rows of all micro-batches).
When R is small compared with the layer width, the preconditioner can work at rank R
(going below the naive bound):

- inverse: ``P = G_inv grad A_inv = (G_inv Gm^T)(Am A_inv)``: 2R(d_G^2 + d_A^2 + d_G d_A) flops
  instead of 2 d_G d_A (d_G + d_A);
- eigen: ``Q_G^T grad Q_A = (Q_G^T Gm^T)(Am Q_A)`` replaces the first two of the four matmuls.

This is only exact when the gradient really is ``Gm^T Am``: not when the loss adds terms on the
weights (L2 penalties), not after DDP averaging, not with a shared weight used in an order the
rows do not follow. Every use is therefore verified first, entry by entry: ``grad`` and
``Gm^T Am`` are two float evaluations of the same sum of R products, each within
``gamma_R sum_n |g_ni| |a_nj|`` of the exact value (any summation order, ``gamma_R ~ R u``), so
they differ by at most ``(R + 2) eps (|Gm|^T |Am|)_ij`` when nothing else is in the gradient. Any
entry further apart means a real term above rounding (an L2 penalty of 1e-8 on O(1) weights
already is): the full computation runs. A single probe vector (Freivalds' check) is not enough:
its tolerance sums the rounding of d entries while a real term adds up only as sqrt(d), so a
penalty of 1e-5 passed it and was dropped. The check costs one rank-R product
(``R d_G d_A`` flops; ``gradient_matches``), counted in ``max_rows``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_kfac.core.linalg import flush_subnormals

# Use the low-rank path only when it saves at least this factor of the full path's flops.
MIN_SAVING = 1.5


def stack_rows(
    a_rows: list[Tensor], g_rows: list[Tensor], dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """``(Am, Gm)`` from the micro-batch row lists, or None when they do not pair up.

    Subnormal entries (``0 < |x| < tiny`` of ``dtype``) are flushed to zero: once a batch is fit,
    many per-example output gradients underflow, and x86 matmuls on subnormal operands run up to
    50x slower. The flush changes ``Gm^T Am`` by less than ``tiny (sum_n |a_nj| + |g_ni|)`` per
    entry, which ``gradient_matches`` allows for. The user's own tensors are not touched (the
    rows are copied by the concatenation) and no global torch setting is changed.
    """
    if not a_rows or len(a_rows) != len(g_rows):
        return None
    if any(a.shape[0] != g.shape[0] for a, g in zip(a_rows, g_rows)):
        return None
    return (  # the concatenations are copies made here: flushed in place (core/linalg.py)
        flush_subnormals(torch.cat(a_rows).to(dtype)),
        flush_subnormals(torch.cat(g_rows).to(dtype)),
    )


def max_rows(d_a: int, d_g: int) -> int:
    """Largest R for which ``R (d_G^2 + d_A^2 + 2 d_G d_A) * MIN_SAVING <= d_G d_A (d_G + d_A)``.

    The same bound holds for both methods: it compares the two matmuls that form
    ``G_inv grad A_inv`` (or ``Q_G^T grad Q_A``) with their rank-R replacement plus the exactness
    check (``gradient_matches``: one R-term product of the gradient's shape).
    """
    full = d_g * d_a * (d_g + d_a)
    return int(full // (MIN_SAVING * (d_g * d_g + d_a * d_a + 2 * d_g * d_a)))


#: Columns of ``grad`` checked per block in ``gradient_matches`` (the block's temporaries stay
#: in cache: one pass over memory instead of five).
CHECK_BLOCK = 128


def gradient_matches(grad: Tensor, am: Tensor, gm: Tensor) -> bool:
    """True when every entry of ``grad`` equals ``gm^T am`` up to the rounding of the products.

    Tolerance per entry: ``(R + 2) eps (|gm|^T |am|)_ij`` (twice the worst-case rounding error of
    an R-term sum of products, ``gamma_R ~ R eps / 2``, plus margin), plus an absolute floor
    ``tiny (1 + R (max|am| + max|gm| + tiny))``: the smallest normal number for entries that
    underflow, and the most that ``stack_rows``' flush of subnormal entries can move an entry
    (each flushed ``g_ni`` or ``a_nj`` was below ``tiny``, so ``|g a - g' a'| <= tiny (|a'| +
    |g'| + tiny)`` per product, R products). A real term above that bound in any entry fails, and
    so does a non-finite gradient. Fast path: ``|gm^T am| <= |gm|^T |am|``, so an entry within
    ``c' |grad_ij|`` (``c' = c (1 - c)``, c the tolerance factor, which also covers a term inside
    ``grad``) passes without the bound. The product is formed CHECK_BLOCK columns at a time and
    reduced to each column's worst excess over that quick tolerance; only the columns with an
    entry left (where the R products cancel, typically the bias column, which autograd sums
    with another kernel) are formed again and checked entry by entry against the bound. So the
    check costs about one rank-R product; with more than ``d_A / R`` such columns it would cost
    a second one, and the full path runs instead (a refusal is always safe).
    """
    finfo = torch.finfo(grad.dtype)
    rows_r = am.shape[0]
    c = (rows_r + 2) * finfo.eps
    quick = c * (1.0 - c)
    floor = finfo.tiny * (1.0 + rows_r * (_largest(am) + _largest(gm) + finfo.tiny))
    column_worst = _column_excess(grad, am, gm, quick)  # NaN / inf propagate through the max
    worst = float(column_worst.max())
    if not (math.isfinite(worst) and math.isfinite(floor)):
        return False
    if worst <= floor:
        return True
    cols = (column_worst > floor).nonzero().flatten()
    if cols.numel() * rows_r > grad.shape[1]:  # the entrywise bound would be a second product
        return False
    part = grad[:, cols]
    excess = torch.mm(gm.T, am[:, cols]).sub_(part).abs_().sub_(part.abs(), alpha=quick)
    rows, at = (excess > floor).nonzero(as_tuple=True)
    gap = excess[rows, at] + quick * part[rows, at].abs()
    bound = (gm[:, rows].abs() * am[:, cols[at]].abs()).sum(0)
    return bool((gap <= bound.mul_(c).add_(floor)).all())


def _largest(rows: Tensor) -> float:
    """``max |rows|`` (0 for no rows), one pass without a temporary."""
    return float(torch.linalg.vector_norm(rows, math.inf)) if rows.numel() else 0.0


def _column_excess(grad: Tensor, am: Tensor, gm: Tensor, quick: float) -> Tensor:
    """``max_i (|(gm^T am)_ij - grad_ij| - quick |grad_ij|)`` for every column j, blockwise."""
    d_g, d_a = grad.shape
    width = min(CHECK_BLOCK, d_a)
    product, magnitude = grad.new_empty(d_g, width), grad.new_empty(d_g, width)
    worst = grad.new_empty(d_a)
    gm_t = gm.T
    for start in range(0, d_a, width):
        stop = min(start + width, d_a)
        block, mag = product[:, : stop - start], magnitude[:, : stop - start]
        torch.mm(gm_t, am[:, start:stop], out=block)
        block.sub_(grad[:, start:stop]).abs_()
        torch.abs(grad[:, start:stop], out=mag)
        block.sub_(mag, alpha=quick)
        torch.amax(block, 0, out=worst[start:stop])
    return worst


def rotated_gradient(dec: Mapping[str, Tensor], am: Tensor, gm: Tensor) -> Tensor:
    """``Q_G^T (Gm^T Am) Q_A`` at rank R (eigen and EKFAC)."""
    return (dec["QG"].T @ gm.T) @ (am @ dec["QA"])


def inverse_product(dec: Mapping[str, Tensor], am: Tensor, gm: Tensor) -> Tensor:
    """``G_inv (Gm^T Am) A_inv`` at rank R."""
    return (dec["G_inv"] @ gm.T) @ (am @ dec["A_inv"])
