"""The inverse method: factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3).

``P = (G + sqrt(damping)/pi I)^-1 grad (A + pi sqrt(damping) I)^-1`` with
``pi = sqrt((tr A / dim A) / (tr G / dim G))``: the two damped inverses are the decomposition
(the damping is baked in, so a changed damping needs a new decomposition). Grouped convolutions
take each group's own pi. The formulas and their conditioning are in core/linalg.py.
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
class InverseDecomposition(Decomposition):
    """Damped inverses of A and G.

    Attributes:
        A_inv, G_inv: ``(A + pi sqrt(damping) I)^-1`` and ``(G + sqrt(damping)/pi I)^-1``
            (column-major, as the Cholesky inverse returns them; a diagonal side: a vector).
        A_support, A_support_inv: when A has zero rows/columns and its support S is at most half
            of it: the indices S and ``A_inv[S, S]`` (core/linalg.py, deflation).
    """

    A_inv: Tensor = dataclasses.field(metadata=COLUMN_MAJOR)
    G_inv: Tensor = dataclasses.field(metadata=COLUMN_MAJOR)
    A_support: Tensor | None = None
    A_support_inv: Tensor | None = None


class InverseMethod(Method):
    """``compute_method="inverse"``: factored damping, baked into the decomposition."""

    name = "inverse"
    decomposition_type = InverseDecomposition
    damping_in_decomposition = True
    low_rank = True

    def decompose(
        self, A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure, damping: float
    ) -> InverseDecomposition:
        return InverseDecomposition.from_state(linalg.inverse_decomposition(A, G, damping, sa, sg))

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
            return lowrank.inverse_product(dec, *rows)
        return linalg.precondition_inverse(grad, dec, sa, sg)

    def layout(
        self, sa: FactorStructure, sg: FactorStructure, dtype: torch.dtype, relative: bool
    ) -> Layout | None:
        cls = InverseDecomposition
        return with_damping_scale(
            [
                layout_entry(cls, "A_inv", sa.shape(), dtype),
                layout_entry(cls, "G_inv", sg.shape(), dtype),
            ],
            relative,
        )

    def held_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        return sa.inverse_numel() + sg.inverse_numel()

    def product_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        return 2  # G_inv grad and the result

    @staticmethod
    def decompose_side(matrix: Tensor) -> None:
        linalg.damped_inverse(matrix, 1e-3)
