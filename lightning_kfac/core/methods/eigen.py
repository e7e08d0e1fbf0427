"""The eigen method: exactly damped inverse through the eigendecompositions of A and G.

``A = Q_A diag(e_A) Q_A^T`` and ``G = Q_G diag(e_G) Q_G^T`` (refreshed every ``inv_update_steps``);
at every step, with the damping in use,
``P = Q_G [(Q_G^T grad Q_A) / (e_G e_A^T + damping)] Q_A^T``, which is
``(A (x) G + damping I)^-1 vec(grad)`` (Martens & Grosse 2015, sec. 6.3 discusses the damping).
A diagonal side (core/factors.py) has the identity as basis: no ``Q`` is stored for it.
The formulas and their conditioning are in core/linalg.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lightning_kfac.core import linalg, lowrank
from lightning_kfac.core.factors import FactorStructure
from lightning_kfac.core.methods.base import (
    COLUMN_MAJOR,
    Decomposition,
    Layout,
    Method,
    Rows,
    layout_entry,
    with_damping_scale,
)


@dataclasses.dataclass(eq=False, kw_only=True)
class EigenDecomposition(Decomposition):
    """Eigenbases and eigenvalues of A and G.

    Attributes:
        QA, QG: eigenvectors (column-major, as ``eigh`` returns them); None for a diagonal side.
        eA, eG: eigenvalues, clamped at zero (a diagonal side: its entries).
        A_support, A_support_Q: when A has zero rows/columns and its support S is at most half
            of it (both sides dense): the indices S and the (|S| x |S|) eigenbasis block, so the
            product multiplies only ``grad[:, S]`` (core/linalg.py, deflation).
    """

    QA: Tensor | None = dataclasses.field(default=None, metadata=COLUMN_MAJOR)
    eA: Tensor
    QG: Tensor | None = dataclasses.field(default=None, metadata=COLUMN_MAJOR)
    eG: Tensor
    A_support: Tensor | None = None
    A_support_Q: Tensor | None = None


def eigen_layout(
    sa: FactorStructure, sg: FactorStructure, dtype: torch.dtype, relative: bool
) -> Layout:
    """``QA eA QG eG`` (no ``Q`` for a diagonal side); the support block is not sent."""
    a, g, cls = sa.dim, sg.dim, EigenDecomposition
    layout = (
        ([layout_entry(cls, "QA", (a, a), dtype)] if sa.has_basis else [])
        + [layout_entry(cls, "eA", (a,), dtype)]
        + ([layout_entry(cls, "QG", (g, g), dtype)] if sg.has_basis else [])
        + [layout_entry(cls, "eG", (g,), dtype)]
    )
    return with_damping_scale(layout, relative)


class EigenMethod(Method):
    """``compute_method="eigen"``: exact damping applied at every step."""

    name = "eigen"
    decomposition_type = EigenDecomposition
    low_rank = True

    def decompose(
        self, A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure, damping: float
    ) -> EigenDecomposition:
        return EigenDecomposition.from_state(linalg.eigen_decomposition(A, G, sa, sg))

    def precondition(
        self,
        grad: Tensor,
        dec: Decomposition,
        damping: float,
        sa: FactorStructure,
        sg: FactorStructure,
        rows: Rows | None = None,
    ) -> Tensor:
        if rows is not None:
            rotated = lowrank.rotated_gradient(dec, *rows)
            return linalg.precondition_eigen_rotated(rotated, dec, damping, sa, sg)
        return linalg.precondition_eigen(grad, dec, damping, sa, sg)

    def layout(
        self, sa: FactorStructure, sg: FactorStructure, dtype: torch.dtype, relative: bool
    ) -> Layout | None:
        return eigen_layout(sa, sg, dtype, relative)

    # cost model (held_numel, product_numel, decompose_side): Method's defaults are eigen's
