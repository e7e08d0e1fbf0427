"""The isotropic factor structure (core/isotropic.py) and the structure registry, against dense
brute force in float64.

An isotropic side replaces its factor F by ``(tr F / d) I`` and nothing else: the engine's factor
must equal ``mean(diag F_ref) I`` (F_ref from tests/support/dense.py's definitions, after two
running-average updates), and its preconditioned gradient the dense solve with the replaced
factor (eigen: ``(A' (x) G' + damping I)^-1 vec(grad)``; inverse: factored Tikhonov on A', G').
It is chosen through ``layer_overrides`` (``a_structure`` / ``g_structure``), the path the docs'
worked example (docs/extending.md) takes for a new structure.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core.structure_registry import STRUCTURES, make_structure
from tests.support import dense as D

DT = torch.float64
DAMPING = 1e-2
DECAY = 0.5


def _isotropic(F_ref: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(F_ref).mean() * torch.eye(F_ref.shape[0], dtype=F_ref.dtype)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("side", ["a_structure", "g_structure"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_isotropic_side_equals_dense_reference(kind, side, method) -> None:
    torch.manual_seed(1)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
        batches = [torch.randn(10, 6, dtype=DT) for _ in range(2)]
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(5 * 16, 3)
        ).to(DT)
        batches = [torch.randn(6, 2, 4, 4, dtype=DT) for _ in range(2)]
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        factor_decay=DECAY,
        kl_clip=None,
        damping=DAMPING,
        compute_method=method,
        layer_overrides=[{"regex": r"^0$", side: "isotropic"}],
    )
    block = pre.blocks["0"]
    chosen = block.a_structure if side == "a_structure" else block.g_structure
    assert (
        chosen.name == "isotropic" and block.structure_reason[side[0].upper()] == "layer_overrides"
    )
    A_run = G_run = None
    for x in batches:  # two updates: the running average of isotropic estimates stays isotropic
        y = torch.randint(0, 3, (x.shape[0],))
        model.zero_grad()
        with D.record(model, ["0"]) as store:
            F.cross_entropy(model(x), y).backward()
        raw = D.grad_matrix(model[0])
        pre.step()
        A_hat, G_hat = D.brute_factors(model, store)["0"]
        if side == "a_structure":
            A_hat = _isotropic(A_hat)
        else:
            G_hat = _isotropic(G_hat)
        A_run = A_hat if A_run is None else DECAY * A_run + (1 - DECAY) * A_hat
        G_run = G_hat if G_run is None else DECAY * G_run + (1 - DECAY) * G_hat
    A, G = pre.factors()["0"]
    assert D.rel_err(A, A_run) <= 1e-12 and D.rel_err(G, G_run) <= 1e-12
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    expected = solve(A_run, G_run, raw, DAMPING)
    assert D.rel_err(D.grad_matrix(model[0]), expected) <= 1e-9


def test_isotropic_embedding_a_and_dense_refused() -> None:
    """nn.Embedding's A (token counts, diagonal by construction) may be made isotropic; a dense
    A is refused with an error naming the option, the value and what is allowed."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 3)).to(DT)
    tokens = torch.tensor([0, 1, 1, 3, 6, 6, 6, 2])
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        damping=DAMPING,
        layer_overrides=[{"regex": r"^0$", "a_structure": "isotropic"}],
    )
    F.cross_entropy(model(tokens), torch.randint(0, 3, (8,))).backward()
    pre.step()
    A, _ = pre.factors()["0"]
    counts = torch.bincount(tokens, minlength=7).to(DT) / len(tokens)
    assert torch.allclose(A, counts.mean() * torch.eye(7, dtype=DT), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match=r"layer_overrides\.a_structure='dense'.*diagonal"):
        KFACPreconditioner(
            nn.Sequential(nn.Embedding(7, 4)),
            layer_overrides=[{"regex": r"^0$", "a_structure": "dense"}],
        )


def test_unknown_or_bad_structure_names_the_option() -> None:
    with pytest.raises(
        ValueError,
        match=r"g_structure='banded'.*\['dense', 'diagonal', "
        r"'isotropic'\]",
    ):
        KFACPreconditioner(
            nn.Sequential(nn.Linear(3, 2)),
            layer_overrides=[{"regex": ".", "g_structure": "banded"}],
        )
    with pytest.raises(ValueError, match=r"layer_overrides\[0\]\.a_structure"):
        KFACConfig(layer_overrides=[{"regex": ".", "a_structure": 3}])


def test_registry_builds_every_structure_by_name() -> None:
    for name, cls in STRUCTURES.items():
        structure = make_structure(name, 5, 2)
        assert type(structure) is cls and structure.name == name
        assert (structure.dim, structure.groups) == (5, 2)
