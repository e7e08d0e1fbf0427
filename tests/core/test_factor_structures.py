"""Factor structures (core/factors.py) against dense brute force in float64.

A side kept diagonal replaces that factor F by diag(F) and nothing else: the engine's factors must
equal ``diag(diag(F_ref))`` for that side (F_ref from the dense definitions in
tests/support/dense.py), and its preconditioned gradient must equal the dense solve with the
replaced factors: eigen ``(A' (x) G' + damping I)^-1 vec(grad)``, inverse the factored-Tikhonov
formula on A', G', EKFAC the dense solve of ``(Q_A (x) Q_G) diag(vec s) (...)^T + damping I``
with the identity as the diagonal side's basis.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core.factors import DenseFactor, DiagonalFactor
from tests.support import dense as D

DT = torch.float64
DAMPING = 1e-2


def _diag_if(F_ref: torch.Tensor, diagonal: bool) -> torch.Tensor:
    return torch.diag(torch.diagonal(F_ref)) if diagonal else F_ref


def _model(kind: str) -> nn.Module:
    if kind == "linear":  # A: 7 (6 + bias), G: 5
        return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),  # A: 19, G: 5
        nn.Linear(5 * 16, 3),
    ).to(DT)


def _input(kind: str) -> torch.Tensor:
    return torch.randn(10, 6, dtype=DT) if kind == "linear" else torch.randn(6, 2, 4, 4, dtype=DT)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("side", ["A", "G", "both"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_diagonal_side_equals_dense_reference_with_diag(kind, side, method) -> None:
    torch.manual_seed(0)
    model = _model(kind)
    x = _input(kind)
    y = torch.randint(0, 3, (x.shape[0],))
    first = model[0]
    a_dim = first.weight[0].numel() + 1
    g_dim = first.weight.shape[0]
    # layer 0's A is its wider side: a limit of g_dim makes A diagonal, 0 makes both diagonal;
    # a diagonal G with a dense A is set on the block directly (before any capture)
    limit = {"A": g_dim, "G": None, "both": 0}[side]
    overrides = [] if limit is None else [{"regex": r"^0$", "max_dense_dim": limit}]
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        factor_decay=0.5,
        kl_clip=None,
        damping=DAMPING,
        compute_method=method,
        layer_overrides=overrides,
    )
    if side == "G":
        pre.blocks["0"].set_structures(DenseFactor(a_dim), DiagonalFactor(g_dim))
    block = pre.blocks["0"]
    diag_a, diag_g = side in ("A", "both"), side in ("G", "both")
    assert block.a_structure.has_basis is not diag_a and block.g_structure.has_basis is not diag_g
    assert pre.blocks[str(len(model) - 1)].g_structure.has_basis  # other layers stay dense
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    raw = D.grad_matrix(first)
    pre.step()
    A_ref, G_ref = D.brute_factors(model, store)["0"]
    A_ref, G_ref = _diag_if(A_ref, diag_a), _diag_if(G_ref, diag_g)
    A, G = pre.factors()["0"]
    assert D.rel_err(A, A_ref) <= 1e-12 and D.rel_err(G, G_ref) <= 1e-12
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    expected = solve(A_ref, G_ref, raw, DAMPING)
    assert D.rel_err(D.grad_matrix(first), expected) <= 1e-9
    assert "QA" not in block.decomposition or not diag_a
    assert "QG" not in block.decomposition or not diag_g


@pytest.mark.parametrize("side", ["A", "G"])
def test_ekfac_with_a_diagonal_side_equals_dense_solve(side) -> None:
    """EKFAC: the diagonal side's basis is the identity; s = E_n[(Q_G^T dW_n Q_A)^2] there."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x, y = torch.randn(12, 6, dtype=DT), torch.randint(0, 3, (12,))
    pre = KFACPreconditioner(
        model,
        compute_method="ekfac",
        factor_decay=0.0,
        damping=DAMPING,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
    )
    a_s, g_s = (
        (DiagonalFactor(7), DenseFactor(4)) if side == "A" else (DenseFactor(7), DiagonalFactor(4))
    )
    pre.blocks["0"].set_structures(a_s, g_s)
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    raw = D.grad_matrix(model[0])
    pre.step()
    per = D.per_example_grads(model, F.cross_entropy, x, y, "0")
    dW = torch.stack([D.unvec(v, 4) for v in per])
    A_ref, G_ref = D.brute_factors(model, store)["0"]
    QA = torch.eye(7, dtype=DT) if side == "A" else torch.linalg.eigh(A_ref)[1]
    QG = torch.eye(4, dtype=DT) if side == "G" else torch.linalg.eigh(G_ref)[1]
    s = (QG.T @ dW @ QA).square().mean(0)
    Q = torch.kron(QA.contiguous(), QG.contiguous())
    M = Q @ torch.diag(D.vec(s)) @ Q.T + DAMPING * torch.eye(28, dtype=DT)
    expected = D.unvec(torch.linalg.solve(M, D.vec(raw)), 4)
    assert D.rel_err(D.grad_matrix(model[0]), expected) <= 1e-8


def test_structure_by_size_and_override() -> None:
    """Dense up to max_dense_dim, diagonal above; Embedding's A diagonal at any size."""
    model = nn.Sequential(nn.Embedding(40, 8), nn.Linear(8, 30), nn.Linear(30, 50, bias=False))
    pre = KFACPreconditioner(model, max_dense_dim=32, memory_budget_gib=None)
    names = {n: (b.a_structure.name, b.g_structure.name) for n, b in pre.blocks.items()}
    assert names == {
        "0": ("diagonal", "dense"),
        "1": ("dense", "dense"),
        "2": ("dense", "diagonal"),
    }
    pre = KFACPreconditioner(
        model, max_dense_dim=32, layer_overrides=[{"regex": "^2$", "max_dense_dim": 64}]
    )
    assert pre.blocks["2"].g_structure.name == "dense"
    assert "diagonal (> max_dense_dim=32)" not in pre.summary().splitlines()[2]
    summary = KFACPreconditioner(model, max_dense_dim=32).summary()
    assert "50 diagonal (> max_dense_dim=32)" in summary and "40 diagonal" in summary


def test_bad_structure_options_name_the_option() -> None:
    with pytest.raises(ValueError, match="max_dense_dim=-1"):
        KFACPreconditioner(nn.Linear(2, 2), max_dense_dim=-1)
    with pytest.raises(ValueError, match="memory_budget_gib=0"):
        KFACPreconditioner(nn.Linear(2, 2), memory_budget_gib=0)
    with pytest.raises(ValueError, match=r"layer_overrides\[0\].max_dense_dim"):
        KFACPreconditioner(nn.Linear(2, 2), layer_overrides=[{"regex": ".", "max_dense_dim": "x"}])


def test_state_with_other_structures_is_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6))
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1)
    F.mse_loss(model(torch.randn(5, 4)), torch.randn(5, 6)).backward()
    pre.step()
    other = KFACPreconditioner(model, max_dense_dim=5)
    with pytest.raises(ValueError, match=r"factor structures|does not fit this model"):
        other.load_state_dict(pre.state_dict())
