"""Pure linear algebra for K-FAC: damped decompositions and their application to a gradient.

Layout: ``grad`` is ``grad W~`` (g_dim x a_dim); ``A`` is (a_dim x a_dim), ``G`` (g_dim x g_dim).
With column-stacking vec, ``(A (x) G) vec(X) = vec(G X A)``, so every formula below is two
(or four) matmuls per layer.

- eigen (exact damping): ``P = Q_G [(Q_G^T grad Q_A) / (e_G e_A^T + damping)] Q_A^T``
- inverse (factored Tikhonov damping, Martens & Grosse 2015, sec. 6.3):
  ``P = (G + sqrt(damping)/pi I)^-1 grad (A + pi sqrt(damping) I)^-1``,
  ``pi = sqrt((tr A / dim A) / (tr G / dim G))``.

Decompositions are computed in the factor dtype; a failure (exception or non-finite output) is
retried once in float64 with a small diagonal jitter before ``DecompositionError`` is raised.
Eigenvalues are clamped at zero (factors are PSD; round-off can make them slightly negative).
A 1-D ``A`` is a diagonal factor (nn.Embedding): its eigenbasis is the identity (no ``QA`` is
stored), its eigenvalues are its entries and its damped inverse is a vector. Stacked factors
(K x d x d, grouped convolutions: one block per group) are decomposed and applied batched; the
inverse method takes each group's own pi.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor


class DecompositionError(RuntimeError):
    """An eigendecomposition or inverse failed even after the float64 retry."""


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _retry(fn: Callable[[Tensor], Dict[str, Tensor]], matrix: Tensor, what: str) -> Dict[str, Tensor]:
    """Run ``fn(matrix)``; on failure retry in float64 with jitter; cast back to matrix.dtype."""
    try:
        out = fn(matrix)
        if _finite(*out.values()):
            return out
    except RuntimeError:
        pass
    if not torch.isfinite(matrix).all():
        raise DecompositionError(f"{what}: the factor has non-finite entries")
    m64 = matrix.double()
    scale = float(m64.diagonal(dim1=-2, dim2=-1).abs().mean()) if m64.numel() else 0.0
    jitter = max(scale, 1.0) * 1e-10
    m64 = m64 + jitter * torch.eye(m64.shape[-1], dtype=m64.dtype, device=m64.device)
    try:
        out = fn(m64)
    except RuntimeError as err:
        raise DecompositionError(f"{what} failed in float64 with jitter: {err}") from err
    if not _finite(*out.values()):
        raise DecompositionError(f"{what} returned non-finite values in float64 with jitter")
    return {k: v.to(matrix.dtype) for k, v in out.items()}


def eigh_psd(matrix: Tensor) -> Dict[str, Tensor]:
    """``{"e": eigenvalues clamped >= 0, "Q": eigenvectors}`` of a symmetric PSD matrix."""
    def fn(m: Tensor) -> Dict[str, Tensor]:
        sym = (m + m.mT) * 0.5
        e, q = torch.linalg.eigh(sym)
        return {"e": e.clamp_min(0.0), "Q": q}
    return _retry(fn, matrix, "eigendecomposition")


def damped_inverse(matrix: Tensor, damping) -> Tensor:
    """``(matrix + damping I)^-1`` of a symmetric PSD matrix (Cholesky, falling back to LU).

    A stack of matrices (K x d x d) takes a float or a (K x 1 x 1) tensor of dampings."""
    def fn(m: Tensor) -> Dict[str, Tensor]:
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        lam = damping.to(m.dtype) if isinstance(damping, Tensor) else damping
        damped = (m + m.mT) * 0.5 + lam * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        inv = (torch.cholesky_inverse(chol) if m.dim() == 2 else torch.cholesky_solve(eye, chol)) \
            if bool((info == 0).all()) else torch.linalg.inv(damped)
        return {"inv": inv}
    return _retry(fn, matrix, "inverse")["inv"]


def mean_eigenvalue(matrix: Tensor) -> float:
    """``tr(M) / dim(M)`` (for a stack of matrices, per group: the mean over all groups)."""
    diagonal = matrix if matrix.dim() == 1 else matrix.diagonal(dim1=-2, dim2=-1)
    return float(diagonal.sum()) / diagonal.numel()


def pi_correction(A: Tensor, G: Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, eq. 11); 1 if degenerate."""
    a_mean, g_mean = mean_eigenvalue(A), mean_eigenvalue(G)
    if a_mean <= 0.0 or g_mean <= 0.0 or not math.isfinite(a_mean / g_mean):
        return 1.0
    return math.sqrt(a_mean / g_mean)


def eigen_decomposition(A: Tensor, G: Tensor) -> Dict[str, Tensor]:
    """``{"QA", "eA", "QG", "eG"}`` for the eigen method (damping is applied at use time)."""
    a, g = (_diagonal_eigen(A) if A.dim() == 1 else eigh_psd(A)), eigh_psd(G)
    dec = {"QA": a["Q"], "eA": a["e"], "QG": g["Q"], "eG": g["e"]}
    return {k: v for k, v in dec.items() if v is not None}


def _diagonal_eigen(diagonal: Tensor) -> Dict[str, Tensor]:
    if not torch.isfinite(diagonal).all():
        raise DecompositionError("eigendecomposition: the factor has non-finite entries")
    return {"e": diagonal.clamp_min(0.0), "Q": None}


def _damped_inverse_any(matrix: Tensor, damping: float) -> Tensor:
    if matrix.dim() == 2:
        return damped_inverse(matrix, damping)
    _diagonal_eigen(matrix)
    return 1.0 / (matrix.clamp_min(0.0) + damping)


def inverse_decomposition(A: Tensor, G: Tensor, damping: float) -> Dict[str, Tensor]:
    """``{"A_inv", "G_inv"}`` with factored Tikhonov damping and the pi correction."""
    root = math.sqrt(damping)
    if A.dim() == 3:  # grouped convolution: each group's own pi
        a_mean = A.diagonal(dim1=-2, dim2=-1).mean(-1)
        g_mean = G.diagonal(dim1=-2, dim2=-1).mean(-1)
        ok = (a_mean > 0) & (g_mean > 0)
        pi = torch.where(ok, (a_mean / torch.where(ok, g_mean, 1.0)).sqrt(), 1.0)
        pi = torch.where(torch.isfinite(pi), pi, 1.0).reshape(-1, 1, 1)
        return {"A_inv": damped_inverse(A, pi * root), "G_inv": damped_inverse(G, root / pi)}
    pi = pi_correction(A, G)
    return {"A_inv": _damped_inverse_any(A, pi * root), "G_inv": damped_inverse(G, root / pi)}


def precondition_eigen(grad: Tensor, dec: Dict[str, Tensor], damping: float) -> Tensor:
    """``(A (x) G + damping I)^-1 vec(grad)`` through the eigendecompositions."""
    rotated = dec["QG"].mT @ grad
    return precondition_eigen_rotated(rotated @ dec["QA"] if "QA" in dec else rotated, dec, damping)


def precondition_eigen_rotated(rotated: Tensor, dec: Dict[str, Tensor], damping: float) -> Tensor:
    """The eigen method from an already rotated gradient ``Q_G^T grad Q_A``."""
    eA = dec["eA"].unsqueeze(-2)
    rotated = rotated / (dec["eG"].unsqueeze(-1) * eA + damping)
    out = dec["QG"] @ rotated
    return out @ dec["QA"].mT if "QA" in dec else out


def precondition_inverse(grad: Tensor, dec: Dict[str, Tensor]) -> Tensor:
    """``G_inv grad A_inv``."""
    A_inv = dec["A_inv"]
    return dec["G_inv"] @ grad @ A_inv if A_inv.dim() == grad.dim() else (dec["G_inv"] @ grad) * A_inv
