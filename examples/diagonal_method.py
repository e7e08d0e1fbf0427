"""A complete compute method in one file: the diagonal Kronecker approximation.

``F ~ diag(A) (x) diag(G)``: the decomposition keeps only the two diagonals, and
``P = grad / (diag(G) diag(A)^T + damping)`` (elementwise), i.e.
``vec(P) = (diag(A) (x) diag(G) + damping I)^-1 vec(grad)``. It is the worked example of
docs/extending.md ("Adding a compute method"): a ``Decomposition`` dataclass whose field names
are its checkpoint keys, a ``Method`` subclass, and one registry line. Dense factors only (a
diagonal side, core/factors.py, would store the diagonal already).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from lightning_kfac.core.factors import FactorStructure
from lightning_kfac.core.methods.base import (
    Decomposition,
    Layout,
    Method,
    Rows,
    layout_entry,
    with_damping_scale,
)


@dataclasses.dataclass(eq=False, kw_only=True)
class DiagonalDecomposition(Decomposition):
    """``dA = diag(A)``, ``dG = diag(G)`` (clamped at zero: the factors are PSD)."""

    dA: Tensor
    dG: Tensor


class DiagonalMethod(Method):
    """``compute_method="diagonal"``: damping applied at every step, like eigen."""

    name = "diagonal"
    decomposition_type = DiagonalDecomposition

    def decompose(
        self, A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure, damping: float
    ) -> DiagonalDecomposition:
        return DiagonalDecomposition(dA=A.diagonal().clamp_min(0.0), dG=G.diagonal().clamp_min(0.0))

    def precondition(
        self,
        grad: Tensor,
        dec: Decomposition,
        damping: float,
        sa: FactorStructure,
        sg: FactorStructure,
        rows: Rows | None = None,
    ) -> Tensor:
        assert isinstance(dec, DiagonalDecomposition)
        return grad / (torch.outer(dec.dG, dec.dA) + damping)

    def held_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        return sa.dim + sg.dim  # for the summary's memory column (the default is eigen's)

    def layout(
        self, sa: FactorStructure, sg: FactorStructure, dtype: torch.dtype, relative: bool
    ) -> Layout | None:
        # under DDP one owner rank computes it and sends these two vectors to the others
        cls = DiagonalDecomposition
        return with_damping_scale(
            [layout_entry(cls, "dA", (sa.dim,), dtype), layout_entry(cls, "dG", (sg.dim,), dtype)],
            relative,
        )
