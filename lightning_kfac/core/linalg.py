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
Every retry is announced with a ``DecompositionRetryWarning`` (the preconditioner counts and
logs them per layer), never silently. Eigenvalues are clamped at zero (factors are PSD;
round-off can make them slightly negative).

Conditioning before decomposing: the factor is symmetrized, and the decoupled rows/columns of a
2-D factor (zero off the diagonal) are split off (deflation). An input feature that is zero in every
captured row (a conv kernel tap that only ever reads zero padding, e.g. the 3x3 convs of a ResNet
stage at 1x1 resolution, where 8 of 9 taps see padding; a dead ReLU channel; a constant-zero pixel)
gives a zero row and column of ``A`` (or, with an identity-blended factor, a row that is zero off
the diagonal): ``e_j`` is then an exact eigenvector with eigenvalue ``A_jj``, and only
the support block ``M[S, S]`` is decomposed (or inverted). This is exact, it is (n / |S|)^3
times cheaper, and it removes the massively repeated zero eigenvalue on which float32 ``eigh``
fails to converge. When the support is at most half of A, it is kept (``"A_support"``, with the
block ``"A_support_Q"`` or ``"A_support_inv"``) so that preconditioning multiplies only
``grad[:, S]`` by the (|S| x |S|) block (the zero part is ``grad[:, Z]`` over the damping).
How each side is decomposed and applied is its factor structure's business (core/factors.py):
a diagonal side has the identity as eigenbasis (no ``QA`` / ``QG`` is stored), its entries as
eigenvalues and a vector as damped inverse; the formulas above then hold with that side replaced
by its diagonal. Stacked factors (K x d x d, grouped convolutions: one block per group) are
decomposed and applied batched; the inverse method takes each group's own pi.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from lightning_kfac.core.factors import FactorStructure


def flush_subnormals(x: Tensor) -> Tensor:
    """``x`` with every entry of magnitude below the smallest normal number set to 0, in place.

    Only for a tensor the caller owns (a concatenation or a cast it made). One O(size) pass.
    """
    if x.is_floating_point():
        x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny, 0.0)
    return x


def without_subnormals(x: Tensor) -> Tensor:
    """``x`` with its subnormal entries (``0 < |x| < tiny``) set to 0, as a copy; ``x`` itself
    when it holds none or is not a CPU float tensor. ``x`` is never written.

    Why: once a batch is fit, many per-example output gradients (and the weight gradients they
    sum to) underflow, and x86 matmuls on subnormal operands run tens to hundreds of times
    slower; the slowdown is the CPU's (microcode assists), so other devices get ``x`` as is and
    no host sync. What it changes: a flushed operand entry was below ``tiny``, so a product of R
    terms moves by less than ``tiny * R * max|other operand|`` per entry (about 1e-33 for R = 128
    rows of magnitude up to 1e3 in float32), far below the float32 rounding of any result that
    is not itself at the underflow level. Normal entries, infinities and NaNs are kept bit for
    bit. A tensor without subnormals is returned unchanged (same storage and strides, so every
    later product rounds exactly as before). No global torch setting changes.
    """
    if not x.is_floating_point() or x.device.type != "cpu":
        return x
    mag = x.abs()
    under = (mag < torch.finfo(x.dtype).tiny) & (mag > 0)
    return x.masked_fill(under, 0.0) if bool(under.any()) else x


def cast_without_subnormals(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` with its subnormal entries (in ``dtype``) set to 0 (``without_subnormals``:
    a copy only when there are any; ``x`` is never written)."""
    return without_subnormals(x.to(dtype))


class DecompositionError(RuntimeError):
    """An eigendecomposition or inverse failed even after the float64 retry."""


class DecompositionRetryWarning(RuntimeWarning):
    """A decomposition failed in the factor dtype and was retried in float64 with jitter."""


def all_finite(*tensors: Tensor) -> bool:
    """True when no entry of the tensors is NaN or +-inf, with one host sync.

    One reduction pass per tensor (``torch.aminmax``: a NaN or an infinity shows up in the
    extremes, and nothing can overflow); ``torch.isfinite(t).all()`` builds a boolean tensor in
    several passes and costs about ten times as much on CPU (126 ms for a 4608 x 4608 factor on
    one thread, against 13 ms)."""
    extremes = [torch.stack(torch.aminmax(t)).to(torch.float64) for t in tensors if t.numel()]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


def _retry(
    fn: Callable[[Tensor], dict[str, Tensor]], matrix: Tensor, what: str
) -> dict[str, Tensor]:
    """Run ``fn(matrix)``; on failure retry in float64 with jitter; cast back to matrix.dtype."""
    try:
        out = fn(matrix)
        if all_finite(*out.values()):
            return out
        reason = "non-finite output"
    except RuntimeError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if not all_finite(matrix):
        raise DecompositionError(f"{what}: the factor has non-finite entries")
    shape = "x".join(str(n) for n in matrix.shape)
    warnings.warn(
        DecompositionRetryWarning(
            f"{what} of a {shape} {matrix.dtype} factor failed ({reason}); retrying in float64 "
            "with jitter"
        ),
        stacklevel=3,
    )
    m64 = matrix.double()
    scale = float(m64.diagonal(dim1=-2, dim2=-1).abs().mean()) if m64.numel() else 0.0
    jitter = max(scale, 1.0) * 1e-10
    m64 = m64 + jitter * torch.eye(m64.shape[-1], dtype=m64.dtype, device=m64.device)
    try:
        out = fn(m64)
    except RuntimeError as err:
        raise DecompositionError(f"{what} failed in float64 with jitter: {err}") from err
    if not all_finite(*out.values()):
        raise DecompositionError(f"{what} returned non-finite values in float64 with jitter")
    return {k: v.to(matrix.dtype) for k, v in out.items()}


def support(matrix: Tensor) -> Tensor | None:
    """Indices of the rows of a 2-D matrix with a nonzero OFF-diagonal entry; None when every
    row has one (or for a stack of matrices, which is never deflated). The other rows are
    decoupled: zero apart from the diagonal (an always-zero input feature: exactly zero, or the
    diagonal of an identity-blended factor)."""
    if matrix.dim() != 2:
        return None
    coupled = matrix != 0
    coupled.fill_diagonal_(False)
    coupled = coupled.any(dim=1)
    if bool(coupled.all()):
        return None
    return coupled.nonzero().flatten()


def eigh_psd(matrix: Tensor) -> dict[str, Tensor]:
    """``{"e": eigenvalues clamped >= 0, "Q": eigenvectors}`` of a symmetric PSD matrix, plus
    ``"support"`` (see ``support``) when decoupled rows/columns were deflated: their
    eigenvectors are unit vectors with their diagonal entry as eigenvalue, listed first."""

    def fn(m: Tensor) -> dict[str, Tensor]:
        sym = (m + m.mT) * 0.5
        e, q = torch.linalg.eigh(sym)
        return {"e": e.clamp_min(0.0), "Q": q}

    keep = support(matrix)
    if keep is None:
        return _retry(fn, matrix, "eigendecomposition")
    n, k = matrix.shape[0], keep.numel()
    sub = _retry(fn, matrix[keep][:, keep], "eigendecomposition") if k else {}
    zero = torch.ones(n, dtype=torch.bool, device=matrix.device)
    zero[keep] = False
    Q = matrix.new_zeros(n, n)
    zero_idx = zero.nonzero().flatten()
    Q[zero_idx, torch.arange(n - k, device=matrix.device)] = 1.0
    e = matrix.new_zeros(n)
    e[: n - k] = matrix.diagonal()[zero_idx].clamp_min(0.0)
    if k:
        Q[keep.unsqueeze(1), torch.arange(n - k, n, device=matrix.device)] = sub["Q"]
        e[n - k :] = sub["e"]
        Q = _layout_like(Q, sub["Q"])
    return {"e": e, "Q": Q, "support": keep}


def _layout_like(full: Tensor, ref: Tensor) -> Tensor:
    """``full`` in ``ref``'s memory order (LAPACK returns column-major; core/kaisa.py relies on
    every rank's matmuls seeing the layout that the decomposition normally has)."""
    if ref.dim() == 2 and not ref.is_contiguous() and ref.T.is_contiguous():
        return full.T.contiguous().T
    return full


def damped_inverse(matrix: Tensor, damping: float | Tensor) -> Tensor:
    """``(matrix + damping I)^-1`` of a symmetric PSD matrix (Cholesky, falling back to LU).

    A stack of matrices (K x d x d) takes a float or a (K x 1 x 1) tensor of dampings. The
    exactly-zero rows/columns of a 2-D matrix are deflated (their block is ``I / damping``)."""

    def fn(m: Tensor) -> dict[str, Tensor]:
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        lam = damping.to(m.dtype) if isinstance(damping, Tensor) else damping
        damped = (m + m.mT) * 0.5 + lam * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        inv = (
            (torch.cholesky_inverse(chol) if m.dim() == 2 else torch.cholesky_solve(eye, chol))
            if bool((info == 0).all())
            else torch.linalg.inv(damped)
        )
        return {"inv": inv}

    keep = support(matrix) if not isinstance(damping, Tensor) else None
    if keep is None:
        return _retry(fn, matrix, "inverse")["inv"]
    inv = torch.diag(1.0 / (matrix.diagonal().clamp_min(0.0) + damping))
    if keep.numel():
        sub = _retry(fn, matrix[keep][:, keep], "inverse")["inv"]
        inv[keep.unsqueeze(1), keep] = sub
        inv = _layout_like(inv, sub)
    return inv


def pi_correction(a_mean: float, g_mean: float) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` (Martens & Grosse 2015, eq. 11) from the two
    mean eigenvalues; 1 if degenerate."""
    if a_mean <= 0.0 or g_mean <= 0.0 or not math.isfinite(a_mean / g_mean):
        return 1.0
    return math.sqrt(a_mean / g_mean)


def eigen_decomposition(
    A: Tensor, G: Tensor, sa: FactorStructure, sg: FactorStructure
) -> dict[str, Tensor]:
    """``{"QA", "eA", "QG", "eG"}`` for the eigen method (damping is applied at use time); a side
    without an eigenbasis (diagonal) has no ``Q`` entry. With both sides dense and A deflated
    (``support``) to at most half its size, ``A_support`` / ``A_support_Q`` are kept for the
    support-block product (``_precondition_eigen_deflated``)."""
    QA, eA = sa.eigen(A)
    QG, eG = sg.eigen(G)
    dec = {"QA": QA, "eA": eA, "QG": QG, "eG": eG}
    keep = support(A) if QA is not None and QG is not None else None
    if QA is not None and keep is not None and _deflation_pays(keep, A.shape[0]):  # Q_S kept
        n, k = A.shape[0], keep.numel()
        dec["A_support"], dec["A_support_Q"] = keep, QA[keep, n - k :].contiguous()
    return {k: v for k, v in dec.items() if v is not None}


def inverse_decomposition(
    A: Tensor, G: Tensor, damping: float, sa: FactorStructure, sg: FactorStructure
) -> dict[str, Tensor]:
    """``{"A_inv", "G_inv"}`` with factored Tikhonov damping and the pi correction."""
    root = math.sqrt(damping)
    if sa.groups > 1:  # grouped convolution: each group's own pi
        a_mean, g_mean = sa.group_means(A), sg.group_means(G)
        ok = (a_mean > 0) & (g_mean > 0)
        group_pi = torch.where(ok, (a_mean / torch.where(ok, g_mean, 1.0)).sqrt(), 1.0)
        group_pi = torch.where(torch.isfinite(group_pi), group_pi, 1.0)
        return {
            "A_inv": sa.damped_inverse(A, group_pi * root),
            "G_inv": sg.damped_inverse(G, root / group_pi),
        }
    pi = pi_correction(sa.mean_eigenvalue(A), sg.mean_eigenvalue(G))
    dec = {"A_inv": sa.damped_inverse(A, pi * root), "G_inv": sg.damped_inverse(G, root / pi)}
    both_dense = dec["A_inv"].dim() == 2 and dec["G_inv"].dim() == 2
    keep = support(A) if both_dense and A.dim() == 2 else None
    if keep is not None and _deflation_pays(keep, A.shape[0]):  # A_inv[S, S] kept
        dec["A_support"] = keep
        dec["A_support_inv"] = dec["A_inv"][keep][:, keep].contiguous()
    return dec


def precondition_eigen(
    grad: Tensor,
    dec: Mapping[str, Tensor],
    damping: float,
    sa: FactorStructure,
    sg: FactorStructure,
) -> Tensor:
    """``(A (x) G + damping I)^-1 vec(grad)`` through the eigendecompositions."""
    if "A_support_Q" in dec:
        return _precondition_eigen_deflated(grad, dec, damping)
    rotated = sa.right_rotate(sg.left_rotate(dec.get("QG"), grad), dec.get("QA"))
    return precondition_eigen_rotated(rotated, dec, damping, sa, sg)


def _deflation_pays(keep: Tensor, a_dim: int) -> bool:
    """Precondition through the support block (kept as ``A_support_Q`` / ``A_support_inv``) when
    it is at most half of A; a few dead channels go through the dense, equally exact, factor."""
    return 2 * keep.numel() <= a_dim


def _precondition_eigen_deflated(grad: Tensor, dec: Mapping[str, Tensor], damping: float) -> Tensor:
    """The eigen method when A has zero rows/columns Z (support S, ``eigh_psd``).

    ``Q_A = [e_Z | Q_S]`` with ``e_A = [d_Z | e_S]``, so
    ``P[:, Z] = Q_G [(Q_G^T grad[:, Z]) / (e_G d_Z^T + damping)]`` (nothing to do when
    ``grad[:, Z]`` is zero, as it is when the gradient comes from the captured inputs) and
    ``P[:, S] = Q_G [(Q_G^T grad[:, S] Q_S) / (e_G e_S^T + damping)] Q_S^T``: the (|S| x |S|)
    block instead of the full (a x a) rotation."""
    keep, QG, QS = dec["A_support"], dec["QG"], dec["A_support_Q"]
    n, k = grad.shape[1], keep.numel()
    eS = dec["eA"][n - k :]
    out = grad.index_fill(1, keep, 0.0)
    if bool(out.any()):
        zero = torch.ones(n, dtype=torch.bool, device=grad.device)
        zero[keep] = False
        Z = zero.nonzero().flatten()
        part = (QG.T @ grad[:, Z]) / (torch.outer(dec["eG"], dec["eA"][: n - k]) + damping)
        out[:, Z] = QG @ part
    rotated = (QG.T @ grad[:, keep]) @ QS
    rotated = rotated / (torch.outer(dec["eG"], eS) + damping)
    out[:, keep] = (QG @ rotated) @ QS.T
    return out


def precondition_eigen_rotated(
    rotated: Tensor,
    dec: Mapping[str, Tensor],
    damping: float,
    sa: FactorStructure,
    sg: FactorStructure,
) -> Tensor:
    """The eigen method from an already rotated gradient ``Q_G^T grad Q_A``."""
    rotated = rotated / (dec["eG"].unsqueeze(-1) * dec["eA"].unsqueeze(-2) + damping)
    return sa.right_unrotate(sg.left_unrotate(dec.get("QG"), rotated), dec.get("QA"))


def precondition_inverse(
    grad: Tensor, dec: Mapping[str, Tensor], sa: FactorStructure, sg: FactorStructure
) -> Tensor:
    """``G_inv grad A_inv`` (with zero rows/columns Z of a dense A: ``A_inv[Z, Z] = I / d``, so the
    columns Z are ``G_inv grad[:, Z] / d`` and only ``A_inv[S, S]`` multiplies)."""
    if "A_support_inv" in dec:
        keep, A_inv = dec["A_support"], dec["A_inv"]
        # A_inv[Z, Z] is diagonal; grad[:, Z] is zero whenever the gradient comes from the
        # captured inputs, and then G_inv grad[:, Z] A_inv[Z, Z] = 0 is skipped
        result = grad.index_fill(1, keep, 0.0)
        if bool(result.any()):
            result = dec["G_inv"] @ (result * A_inv.diagonal())
        result[:, keep] = dec["G_inv"] @ (grad[:, keep] @ dec["A_support_inv"])
        return result
    return sa.right_apply(sg.left_apply(dec["G_inv"], grad), dec["A_inv"])
