"""The isotropic factor structure: a side F replaced by ``(tr F / d) I``.

This is the smallest possible structure and the worked example of docs/extending.md: one
subclass, one registry line (core/structure_registry.py). Kept as a vector of d equal entries
(like :class:`DiagonalFactor`, whose identity eigenbasis, elementwise inverse and products it
inherits), so every method's formula stays exact for the replaced factor: eigen solves
``((tr A/d) I (x) G + damping I)^-1`` for an isotropic A, i.e. the layer is preconditioned by G
alone, scaled (a "one-sided" K-FAC; Martens & Grosse 2015, sec. 3, with A's Kronecker side
reduced to its mean eigenvalue). Memory and refresh time O(d).

Select it per layer and side through ``layer_overrides``, e.g.
``{"regex": "lm_head", "g_structure": "isotropic"}``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kfac.core.factors import DiagonalFactor


class IsotropicFactor(DiagonalFactor):
    """``(tr F / d) I``: the estimate's diagonal averaged per group; the rest as diagonal."""

    name = "isotropic"

    def accumulate(
        self, acc: Tensor | None, rows: Tensor, dtype: torch.dtype, scale: float = 1.0
    ) -> Tensor:
        flat = _flatten(super().accumulate(None, rows, dtype, scale))
        return flat if acc is None else acc + flat

    def row_sum(self, rows: Tensor) -> Tensor:
        return _flatten(super().row_sum(rows))


def _flatten(diagonal: Tensor) -> Tensor:
    """Every entry replaced by the mean of its group's entries: ``(tr F / d) 1``."""
    return diagonal.mean(-1, keepdim=True).expand_as(diagonal).clone()
