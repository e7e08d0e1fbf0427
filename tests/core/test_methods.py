"""Compute methods as types (lightning_kfac/core/methods/): the registry, the typed
decompositions' state format, their transfer layout, and the worked example of
docs/extending.md (examples/diagonal_method.py) run through the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from examples.diagonal_method import DiagonalDecomposition, DiagonalMethod
from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core.factors import DenseFactor, DiagonalFactor
from lightning_kfac.core.methods import method_for, method_names, method_of_state
from lightning_kfac.core.methods.eigen import EigenDecomposition
from lightning_kfac.core.methods.ekfac import EKFACDecomposition
from lightning_kfac.core.methods.inverse import InverseDecomposition
from lightning_kfac.core.methods.registry import register, unregister


@pytest.fixture
def diagonal_method():
    register(DiagonalMethod)
    yield DiagonalMethod
    unregister(DiagonalMethod.name)


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=gen)
    return x.T @ x / (3 * n)


def test_registry_names_and_unknown_method_error():
    assert method_names() == ("eigen", "inverse", "ekfac")
    assert method_for("inverse").damping_in_decomposition
    assert not method_for("eigen").damping_in_decomposition
    assert method_for("ekfac").needs_pairs and not method_for("eigen").needs_pairs
    with pytest.raises(ValueError, match=r"compute_method='bogus'.*'eigen', 'inverse', 'ekfac'"):
        method_for("bogus")
    with pytest.raises(ValueError, match=r"compute_method.*'bogus'.*'eigen', 'inverse', 'ekfac'"):
        KFACConfig(compute_method="bogus")


@pytest.mark.parametrize(
    "name, keys",
    [
        ("eigen", ["QA", "eA", "QG", "eG", "damping_scale"]),
        ("inverse", ["A_inv", "G_inv", "damping_scale"]),
        ("ekfac", ["QA", "eA", "QG", "eG", "scale", "scale_updates", "damping_scale"]),
    ],
)
def test_state_keys_round_trip_and_method_detection(name, keys):
    """to_state writes the historical checkpoint keys in their historical order;
    from_state reads them back; the keys alone say which method saved them."""
    A, G, sa, sg = _spd(5, 0), _spd(3, 1), DenseFactor(5), DenseFactor(3)
    dec = method_for(name).decompose(A, G, sa, sg, damping=0.1)
    dec.damping_scale = torch.tensor(2.0, dtype=torch.float64)
    state = dec.to_state()
    assert list(state) == keys
    back = method_for(name).from_state(state)
    assert type(back) is type(dec)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    assert method_of_state(state) is method_for(name)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="fits no compute method"):
        method_of_state({"QA": torch.eye(2), "A_inv": torch.eye(2)})
    with pytest.raises(ValueError, match="has no entries"):
        EigenDecomposition.from_state(
            {"eA": torch.ones(2), "eG": torch.ones(2), "A_inv": torch.eye(2)}
        )


def test_layout_column_major_matches_what_lapack_returns():
    """The transfer layout declares column-major exactly the matrices that come back
    column-major, so receivers allocate the owner's memory layout."""
    A, G = _spd(6, 2), _spd(4, 3)
    for name in ("eigen", "inverse"):
        method = method_for(name)
        dec = method.decompose(A, G, DenseFactor(6), DenseFactor(4), damping=0.1)
        layout = method.layout(DenseFactor(6), DenseFactor(4), torch.float32, relative=False)
        for key, shape, dtype, col in layout:
            value = dec[key]
            assert tuple(value.shape) == shape and value.dtype == dtype
            produced_col = (
                value.dim() == 2 and not value.is_contiguous() and value.T.is_contiguous()
            )
            assert col == produced_col, (name, key)
    diag = method_for("eigen").layout(DiagonalFactor(6), DenseFactor(4), torch.float64, True)
    assert [e[0] for e in diag] == ["eA", "QG", "eG", "damping_scale"]
    assert method_for("ekfac").layout(DenseFactor(6), DenseFactor(4), torch.float32, False) is None


def test_types_are_distinct_and_ekfac_extends_eigen():
    assert issubclass(EKFACDecomposition, EigenDecomposition)
    assert not issubclass(InverseDecomposition, EigenDecomposition)


def test_worked_example_diagonal_method_matches_dense_reference(diagonal_method):
    """examples/diagonal_method.py, registered in one line, preconditions like the dense
    float64 ``(diag(A) (x) diag(G) + damping I)^-1 vec(grad W~)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    damping = 0.05
    pre = KFACPreconditioner(
        model,
        compute_method="diagonal",
        damping=damping,
        kl_clip=None,
        factor_update_steps=1,
        inv_update_steps=1,
    )
    assert {b.method.name for b in pre.blocks.values()} == {"diagonal"}
    model(torch.randn(8, 4, dtype=torch.float64)).pow(2).mean().backward()
    raw = {
        name: torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone()
        for name, m in model.named_children()
        if isinstance(m, nn.Linear)
    }
    pre.step()
    factors = pre.factors()
    for name, grad in raw.items():
        A, G = factors[name]
        fisher = torch.kron(torch.diag(A.diagonal()), torch.diag(G.diagonal()))
        vec = grad.T.reshape(-1)  # column-stacking vec
        expected = torch.linalg.solve(
            fisher + damping * torch.eye(vec.numel(), dtype=torch.float64), vec
        )
        expected = expected.reshape(grad.shape[1], grad.shape[0]).T
        module = model[int(name)]
        torch.testing.assert_close(module.weight.grad, expected[:, :-1], rtol=1e-12, atol=0)
        torch.testing.assert_close(module.bias.grad, expected[:, -1], rtol=1e-12, atol=0)
        dec = pre.blocks[name].decomposition
        assert isinstance(dec, DiagonalDecomposition)
        assert sorted(pre.state_dict()["layers"][name]["decomposition"]) == ["dA", "dG"]
