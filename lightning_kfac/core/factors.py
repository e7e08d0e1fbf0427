"""Factor structures: how one side (A or G) of a layer's Kronecker factor is kept and used.

A layer's Fisher block is approximated by ``A (x) G`` (Martens & Grosse 2015, sec. 3). Each side
is a symmetric PSD matrix of dimension d, and each side has a *structure* that decides what is
stored and how it is estimated, decomposed, damped and applied:

- :class:`DenseFactor`: the full ``d x d`` matrix. Estimate ``sum_n r_n r_n^T`` (one matmul),
  eigendecomposition ``F = Q diag(e) Q^T`` (``torch.linalg.eigh``) or damped inverse
  (Cholesky). Memory O(d^2), refresh time O(d^3).
- :class:`DiagonalFactor`: only ``diag(F)``, a vector. Estimate ``sum_n r_n^2`` (per entry);
  the eigenbasis is the identity and the eigenvalues are the entries, so no ``Q`` is stored; the
  damped inverse is ``1 / (diag + damping)``. Memory and refresh time O(d). Used for
  nn.Embedding's A (there the true A is diagonal: token counts / N, so nothing is lost) and for
  sides too wide for a dense matrix (there ``F`` is *replaced by* ``diag(F)``: every formula of
  the method stays exact for that replaced factor).

Running averages are the same for every structure (``F <- decay F + (1 - decay) F^``, elementwise
on what is stored), so they live in the block. Everything that depends on the structure lives
here: callers never look at a tensor's rank.

In the preconditioned product ``grad`` is ``grad W~`` (g_dim x a_dim); G acts from the left and
A from the right (``(A (x) G) vec(X) = vec(G X A)``). The ``left_*`` / ``right_*`` methods below
are those products for one side; for a diagonal side they are broadcasts, or nothing at all.

Adding a structure (e.g. block-diagonal, low rank plus diagonal) is one new file with a subclass
of :class:`FactorStructure` and one entry in ``STRUCTURES`` (core/structure_registry.py);
core/isotropic.py is the smallest example, docs/extending.md walks through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_kfac.core.layers import accumulate_outer
from lightning_kfac.core.linalg import DecompositionError, damped_inverse, eigh_psd

#: A diagonal side up to this dimension is shown as a dense matrix by ``to_matrix``; wider ones as
#: a sparse (COO) diagonal matrix.
DENSE_VIEW_LIMIT = 4096


class FactorStructure:
    """One side of a Kronecker factor: storage, estimate, decomposition and application.

    Attributes:
        name: the registry name (core/structure_registry.py; shown in the summary, accepted by
            ``layer_overrides``' ``a_structure`` / ``g_structure``).
        has_basis: True when the eigendecomposition has a non-identity eigenbasis ``Q``.
        dim: the side's dimension d.
    """

    name = "structure"
    has_basis = True

    def __init__(self, dim: int, groups: int = 1):
        self.dim = int(dim)
        self.groups = int(groups)  # > 1: one factor per group, stacked (grouped convolutions)

    def __repr__(self) -> str:
        extra = f", groups={self.groups}" if self.groups > 1 else ""
        return f"{type(self).__name__}({self.dim}{extra})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FactorStructure)
            and type(other) is type(self)
            and other.dim == self.dim
            and other.groups == self.groups
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.dim, self.groups))

    @property
    def _lead(self) -> tuple[int, ...]:
        return (self.groups,) if self.groups > 1 else ()

    def accumulate(
        self, acc: Tensor | None, rows: Tensor, dtype: torch.dtype, scale: float = 1.0
    ) -> Tensor:
        """``acc + scale^2 sum_n r_n r_n^T`` in this structure (dense, stacked per group or
        one-hot index rows: core/layers.py's ``accumulate_outer``)."""
        return accumulate_outer(acc, rows, self.dim, not self.has_basis, dtype, scale)

    def group_means(self, factor: Tensor) -> Tensor:
        """``tr(F_k) / d`` per group (a (groups,) tensor)."""
        raise NotImplementedError

    def diagonal_of(self, factor: Tensor) -> Tensor:
        """The diagonal entries (per group when stacked)."""
        raise NotImplementedError

    def isotropic(self, estimate: Tensor, init: str) -> Tensor:
        """``I`` (``identity``) or ``(tr X/dim X) I`` (``scaled_identity``) in this structure,
        shaped like ``estimate`` (the start of the running average for ``factor_init``)."""
        diag = self.diagonal_of(estimate)
        scale = float(diag.mean()) if init == "scaled_identity" and diag.numel() else 1.0
        ones = torch.full_like(diag, scale)
        return torch.diag_embed(ones) if self.has_basis else ones

    # -- storage ----------------------------------------------------------------------------------
    def shape(self) -> tuple[int, ...]:
        """Shape of the stored factor (and of its accumulator and batch estimate)."""
        raise NotImplementedError

    def numel(self) -> int:
        n = 1
        for s in self.shape():
            n *= s
        return n

    def zeros(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.zeros(self.shape(), dtype=dtype, device=device)

    def to_matrix(self, factor: Tensor) -> Tensor:
        """The factor as a ``d x d`` matrix (a copy; for ``factors()`` and tests)."""
        raise NotImplementedError

    # -- estimate ---------------------------------------------------------------------------------
    def row_sum(self, rows: Tensor) -> Tensor:
        """``sum_n r_n r_n^T`` of R rows (R x d) in this structure (a new tensor)."""
        raise NotImplementedError

    def mean_eigenvalue(self, factor: Tensor) -> float:
        """``tr(F) / d`` (the same for F and diag(F))."""
        raise NotImplementedError

    # -- decomposition ----------------------------------------------------------------------------
    def eigen(self, factor: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(Q, e)`` with ``F = Q diag(e) Q^T``, ``e >= 0``; ``Q`` None: an identity basis."""
        raise NotImplementedError

    def damped_inverse(self, factor: Tensor, damping: float | Tensor) -> Tensor:
        """``(F + damping I)^-1`` in this structure (damping: a float, or per group a (groups,)
        tensor)."""
        raise NotImplementedError

    # -- application (grad is g_dim x a_dim: G on the left, A on the right) -----------------------
    def left_rotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        """``Q^T X``."""
        raise NotImplementedError

    def left_unrotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        """``Q X``."""
        raise NotImplementedError

    def right_rotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        """``X Q``."""
        raise NotImplementedError

    def right_unrotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        """``X Q^T``."""
        raise NotImplementedError

    def left_apply(self, M: Tensor, X: Tensor) -> Tensor:
        """``M X`` for M in this structure (e.g. a damped inverse)."""
        raise NotImplementedError

    def right_apply(self, X: Tensor, M: Tensor) -> Tensor:
        """``X M`` for M in this structure."""
        raise NotImplementedError

    def product(self, factor: Tensor, X: Tensor, side: str) -> Tensor:
        """``F X`` (side "left") or ``X F`` (side "right")."""
        return self.left_apply(factor, X) if side == "left" else self.right_apply(X, factor)

    # -- memory model (numbers of elements; see core/footprint.py) --------------------------------
    def eigen_numel(self) -> int:
        """Stored eigendecomposition: ``Q`` (if any) and ``e``."""
        raise NotImplementedError

    def inverse_numel(self) -> int:
        """Stored damped inverse."""
        return self.numel()

    def decompose_transient_numel(self, method: str) -> int:
        """Peak temporaries of one decomposition, beyond the stored result."""
        raise NotImplementedError

    def capture_transient_numel(self) -> int:
        """Peak temporaries of adding one micro-batch's rows, beyond the accumulator."""
        raise NotImplementedError


class DenseFactor(FactorStructure):
    """The full ``d x d`` factor (the K-FAC default)."""

    name = "dense"
    has_basis = True

    def shape(self) -> tuple[int, ...]:
        return (*self._lead, self.dim, self.dim)

    def to_matrix(self, factor: Tensor) -> Tensor:
        return factor.clone()

    def row_sum(self, rows: Tensor) -> Tensor:
        return rows.mT @ rows

    def mean_eigenvalue(self, factor: Tensor) -> float:
        diagonal = factor.diagonal(dim1=-2, dim2=-1)
        return float(diagonal.sum()) / diagonal.numel()

    def group_means(self, factor: Tensor) -> Tensor:
        return factor.diagonal(dim1=-2, dim2=-1).mean(-1)

    def diagonal_of(self, factor: Tensor) -> Tensor:
        return factor.diagonal(dim1=-2, dim2=-1)

    def eigen(self, factor: Tensor) -> tuple[Tensor | None, Tensor]:
        out = eigh_psd(factor)
        return out["Q"], out["e"]

    def damped_inverse(self, factor: Tensor, damping: float | Tensor) -> Tensor:
        if isinstance(damping, Tensor):
            damping = damping.reshape(-1, 1, 1)
        return damped_inverse(factor, damping)

    def left_rotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        assert Q is not None, "a dense factor has a basis"
        return Q.mT @ X

    def left_unrotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        assert Q is not None, "a dense factor has a basis"
        return Q @ X

    def right_rotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        assert Q is not None, "a dense factor has a basis"
        return X @ Q

    def right_unrotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        assert Q is not None, "a dense factor has a basis"
        return X @ Q.mT

    def left_apply(self, M: Tensor, X: Tensor) -> Tensor:
        return M @ X

    def right_apply(self, X: Tensor, M: Tensor) -> Tensor:
        return X @ M

    def eigen_numel(self) -> int:
        return self.groups * (self.dim * self.dim + self.dim)

    def decompose_transient_numel(self, method: str) -> int:
        # eigen: the symmetrised copy and LAPACK's syevd workspace (~2 d^2) besides Q; inverse:
        # identity, symmetrised and damped copies / the Cholesky factor. Both measured as peak
        # resident memory at d = 1200 and 2400 (tests/support/peak_memory.py's method): 4.0 d^2
        # with the result for eigh_psd, 4.1-4.3 d^2 for damped_inverse.
        return 3 * self.groups * self.dim * self.dim

    def capture_transient_numel(self) -> int:
        return self.numel()  # one micro-batch's outer product before it is added


class DiagonalFactor(FactorStructure):
    """Only ``diag(F)``: a vector; identity eigenbasis; elementwise inverse and products."""

    name = "diagonal"
    has_basis = False

    def shape(self) -> tuple[int, ...]:
        return (*self._lead, self.dim)

    def to_matrix(self, factor: Tensor) -> Tensor:
        if self.groups > 1:
            return torch.diag_embed(factor)
        if self.dim <= DENSE_VIEW_LIMIT:
            return torch.diag(factor)
        # a dense d x d copy of a wide diagonal would be the very memory this structure saves
        index = torch.arange(self.dim, device=factor.device).expand(2, -1)
        return torch.sparse_coo_tensor(
            index, factor.clone(), (self.dim, self.dim), check_invariants=False
        ).coalesce()

    def row_sum(self, rows: Tensor) -> Tensor:
        return rows.square().sum(-2)

    def mean_eigenvalue(self, factor: Tensor) -> float:
        return float(factor.sum()) / factor.numel()

    def group_means(self, factor: Tensor) -> Tensor:
        return factor.mean(-1)

    def diagonal_of(self, factor: Tensor) -> Tensor:
        return factor

    def _check_finite(self, factor: Tensor, what: str) -> None:
        if not torch.isfinite(factor).all():
            raise DecompositionError(f"{what}: the factor has non-finite entries")

    def eigen(self, factor: Tensor) -> tuple[Tensor | None, Tensor]:
        self._check_finite(factor, "eigendecomposition")
        return None, factor.clamp_min(0.0)

    def damped_inverse(self, factor: Tensor, damping: float | Tensor) -> Tensor:
        self._check_finite(factor, "inverse")
        if isinstance(damping, Tensor):
            damping = damping.reshape(-1, 1).to(factor.dtype)
        return 1.0 / (factor.clamp_min(0.0) + damping)

    def left_rotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        return X

    def left_unrotate(self, Q: Tensor | None, X: Tensor) -> Tensor:
        return X

    def right_rotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        return X

    def right_unrotate(self, X: Tensor, Q: Tensor | None) -> Tensor:
        return X

    def left_apply(self, M: Tensor, X: Tensor) -> Tensor:
        return M.unsqueeze(-1) * X

    def right_apply(self, X: Tensor, M: Tensor) -> Tensor:
        return X * M.unsqueeze(-2)

    def eigen_numel(self) -> int:
        return self.numel()

    def decompose_transient_numel(self, method: str) -> int:
        return self.numel()

    def capture_transient_numel(self) -> int:
        return self.numel()
