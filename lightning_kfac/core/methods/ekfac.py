"""The EKFAC method: K-FAC's eigenbasis with a re-estimated diagonal (George et al. 2018).

"Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis", sec. 3-4. The
decomposition is the eigen method's (``Q_A, e_A, Q_G, e_G``) plus the scaling ``s``
(g_dim x a_dim), the second moment of the per-example gradients in the eigenbasis; it starts as
K-FAC's ``e_G e_A^T`` and is re-estimated from captured (input, output-gradient) row pairs by
``core/ekfac.py`` (``EKFACScaling``). At every step, with the damping in use,
``P = Q_G [(Q_G^T grad Q_A) / (s + damping)] Q_A^T``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from lightning_kfac.core import linalg
from lightning_kfac.core.factors import FactorStructure
from lightning_kfac.core.methods.base import Decomposition, Method, Rows
from lightning_kfac.core.methods.eigen import EigenDecomposition


@dataclasses.dataclass(eq=False, kw_only=True)
class EKFACDecomposition(EigenDecomposition):
    """The eigen decomposition plus EKFAC's scaling.

    Attributes:
        scale: ``s`` (g_dim x a_dim); None only in a state saved without it (then K-FAC's
            ``e_G e_A^T`` is used).
        scale_updates: the number of estimates averaged into ``s`` in this basis (a float64
            scalar; 0 until the first estimate, which then replaces ``e_G e_A^T`` outright).
    """

    scale: Tensor | None = None
    scale_updates: Tensor | None = None
    updated_in_place: ClassVar[tuple[str, ...]] = ("scale", "scale_updates")


def ekfac_decomposition(
    A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure
) -> EKFACDecomposition:
    """Eigenbases of A and G and the initial scaling ``e_G e_A^T`` (K-FAC's own eigenvalues)."""
    dec = EKFACDecomposition.from_state(linalg.eigen_decomposition(A, G, sa, sg))
    dec.scale = torch.outer(dec.eG, dec.eA)
    dec.scale_updates = torch.zeros((), dtype=torch.float64)  # no estimate in this basis yet
    return dec


def precondition_ekfac(
    grad: Tensor, dec: Decomposition, damping: float, sa: FactorStructure, sg: FactorStructure
) -> Tensor:
    """``Q_G [(Q_G^T grad Q_A) / (s + damping)] Q_A^T`` (a diagonal side has no ``Q``)."""
    QA, QG = dec.get("QA"), dec.get("QG")
    scale = dec["scale"] if "scale" in dec else torch.outer(dec["eG"], dec["eA"])
    rotated = sa.right_rotate(sg.left_rotate(QG, grad), QA)
    return sa.right_unrotate(sg.left_unrotate(QG, rotated / (scale + damping)), QA)


class EKFACMethod(Method):
    """``compute_method="ekfac"``: damping applied at every step; needs paired rows; its
    decomposition is never shared across ranks (each rank keeps its own scaling sums)."""

    name = "ekfac"
    decomposition_type = EKFACDecomposition
    needs_pairs = True
    extra_held_bytes = 8  # the float64 scale_updates

    def decompose(
        self, A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure, damping: float
    ) -> EKFACDecomposition:
        return ekfac_decomposition(A, G, sa, sg)

    def precondition(
        self,
        grad: Tensor,
        dec: Decomposition,
        damping: float,
        sa: FactorStructure,
        sg: FactorStructure,
        rows: Rows | None = None,
    ) -> Tensor:
        return precondition_ekfac(grad, dec, damping, sa, sg)

    def held_numel(self, sa: FactorStructure, sg: FactorStructure) -> int:
        scaling = sa.groups * sg.dim * sa.dim  # s: g_dim x a_dim
        return sa.eigen_numel() + sg.eigen_numel() + scaling
