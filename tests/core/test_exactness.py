"""K-FAC against brute force, in float64 (docs/conventions.md).

Where K-FAC is exact (one example: the Fisher block of ``vec(W~)`` is ``(a a^T) (x) (g g^T)``),
``A (x) G`` must equal the per-example Fisher from ``torch.func``. Elsewhere the engine's factors
must equal their definitions (Martens & Grosse 2015, sec. 3; KFC, Grosse & Martens 2016, sec. 3
for conv) and its preconditioned gradient the dense solve (eigen: exact damping) or the
factored-Tikhonov formula (inverse: M&G 2015, sec. 6.3), computed from ``tests/support/dense.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.support import dense as D

FACTOR_TOL = 1e-10
PRECOND_TOL = 1e-8


def _kfac():
    from lightning_kfac import KFACPreconditioner

    return KFACPreconditioner


def _mlp(bias: bool = True) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()


def _ce(reduction: str = "mean"):
    def loss(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)

    return loss


def one_step(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn, names: list[str], optimizer=None, **options
) -> tuple[object, dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """Build a preconditioner (factors and decompositions refreshed this step), run one
    forward/backward/``pre.step()``; return it, the brute-force factors and the raw ``grad W~``."""
    opts = dict(factor_update_steps=1, inv_update_steps=1, factor_decay=0.5, kl_clip=None)
    opts.update(options)
    pre = _kfac()(model, **opts)
    modules = dict(model.named_modules())
    with D.record(model, names) as store:
        loss_fn(model(x), y).backward()
    brute = D.brute_factors(model, store, reduction=str(opts.get("loss_reduction", "mean")))
    raw = {n: D.grad_matrix(modules[n]) for n in names}
    pre.step(optimizer)
    return pre, brute, raw


def check_factors(pre, brute: dict[str, tuple[Tensor, Tensor]]) -> None:
    factors = pre.factors()
    assert set(brute) <= set(factors), f"missing layers: {set(brute) - set(factors)}"
    for name, (A_ref, G_ref) in brute.items():
        A, G = factors[name]
        assert A.dtype == torch.float64 and G.dtype == torch.float64, (name, A.dtype, G.dtype)
        assert D.rel_err(A, A_ref) <= FACTOR_TOL, (name, "A", D.rel_err(A, A_ref))
        assert D.rel_err(G, G_ref) <= FACTOR_TOL, (name, "G", D.rel_err(G, G_ref))


def check_preconditioned(
    pre,
    model: nn.Module,
    raw: dict[str, Tensor],
    damping: float,
    method: str = "eigen",
    scale: float = 1.0,
) -> None:
    modules = dict(model.named_modules())
    factors = pre.factors()
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    for name, grad in raw.items():
        A, G = factors[name]
        P_ref = scale * solve(A, G, grad, damping)
        P = D.grad_matrix(modules[name])
        assert D.rel_err(P, P_ref) <= PRECOND_TOL, (name, method, D.rel_err(P, P_ref))


# --------------------------------------------------------------------------------------------
# the references themselves (no engine): they must agree with each other


@pytest.mark.parametrize("bias", [True, False])
def test_reference_per_example_grad_is_kron_a_g(bias: bool) -> None:
    """vec(dW~_n) (torch.func) = a_n (x) g_n (hooks, g_n = N x autograd grad of a mean loss)."""
    torch.manual_seed(0)
    model = _mlp(bias)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with D.record(model, ["0", "2"]) as store:
        F.cross_entropy(model(x), y).backward()
    for name in ["0", "2"]:
        inp, out = store[name][0]
        a, g = D.linear_rows(model[int(name)], inp, out)
        per_ex = D.per_example_grads(model, F.cross_entropy, x, y, name)
        kron = torch.stack([torch.kron(a[n], g[n]) for n in range(6)])
        assert D.rel_err(kron, per_ex) <= 1e-12
        assert D.rel_err(per_ex.mean(0), D.vec(D.grad_matrix(model[int(name)]))) <= 1e-12


@pytest.mark.parametrize(
    "cls,shape,kw",
    [
        (
            nn.Conv2d,
            (3, 2, 7, 6),
            dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        ),
        (nn.Conv1d, (3, 2, 9), dict(kernel_size=3, stride=2, padding=1, dilation=2)),
    ],
)
def test_reference_conv_patches(cls, shape, kw) -> None:
    """Loop patches reproduce the conv output and per-example grads: dW~_n = sum_t g a^T."""
    torch.manual_seed(0)
    conv = cls(2, 4, **kw).double()
    x = torch.randn(*shape, dtype=torch.float64)
    T = conv(x)[0, 0].numel()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * T, 2)).double()
    y = torch.randint(0, 2, (shape[0],))
    with D.record(model, ["0"]) as store:
        F.cross_entropy(model(x), y).backward()
    inp, out = store["0"][0]
    if cls is nn.Conv2d:
        assert torch.equal(D.conv2d_patches_unfold(conv, inp), D.conv_patches_loop(conv, inp))
    a, g = D.conv_rows(conv, inp, out)
    W = D.weight_matrix(conv.weight, conv.bias).detach()
    assert D.rel_err((a @ W.T).transpose(1, 2), out.detach().reshape(shape[0], 4, T)) <= 1e-12
    per_ex = D.per_example_grads(model, F.cross_entropy, x, y, "0")
    ref = torch.stack([D.vec(g[n].T @ a[n]) for n in range(shape[0])])
    assert D.rel_err(ref, per_ex) <= 1e-12


def test_reference_eigen_formula_equals_dense_solve() -> None:
    """P = Q_G [(Q_G^T grad Q_A) / (e_G e_A^T + d)] Q_A^T equals the dense Kronecker solve."""
    torch.manual_seed(0)
    A, G = torch.randn(4, 4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    A, G, grad = A @ A.T, G @ G.T, torch.randn(3, 4, dtype=torch.float64)
    eA, QA = torch.linalg.eigh(A)
    eG, QG = torch.linalg.eigh(G)
    P = QG @ ((QG.T @ grad @ QA) / (eG[:, None] * eA[None] + 0.1)) @ QA.T
    assert D.rel_err(D.eigen_precondition(A, G, grad, 0.1), P) <= 1e-10


# --------------------------------------------------------------------------------------------
# one example: K-FAC is exact


@pytest.mark.parametrize("bias", [True, False])
def test_one_example_kron_equals_exact_fisher_block(bias: bool) -> None:
    torch.manual_seed(1)
    model = _mlp(bias)
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.randint(0, 3, (1,))
    # the torch.func reference runs before the engine hooks the model (they would capture it)
    fisher = {
        n: D.exact_fisher_block(D.per_example_grads(model, F.cross_entropy, x, y, n))
        for n in ["0", "2"]
    }
    pre, brute, _ = one_step(model, x, y, F.cross_entropy, ["0", "2"])
    check_factors(pre, brute)
    factors = pre.factors()
    for name in ["0", "2"]:
        A, G = factors[name]
        assert D.rel_err(torch.kron(A, G), fisher[name]) <= FACTOR_TOL, name


# --------------------------------------------------------------------------------------------
# batch factors and preconditioned gradients, Linear


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seq", [False, True], ids=["2d", "3d"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_linear_factors_and_preconditioned_grad(
    reduction: str, bias: bool, seq: bool, method: str
) -> None:
    torch.manual_seed(2)
    model = _mlp(bias)
    shape = (4, 3) if seq else (8,)
    x = torch.randn(*shape, 5, dtype=torch.float64)
    y = torch.randint(0, 3, shape)
    damping = 0.03
    pre, brute, raw = one_step(
        model,
        x,
        y,
        _ce(reduction),
        ["0", "2"],
        damping=damping,
        compute_method=method,
        loss_reduction=reduction,
    )
    check_factors(pre, brute)
    check_preconditioned(pre, model, raw, damping, method)


# --------------------------------------------------------------------------------------------
# batch factors and preconditioned gradients, Conv (KFC)

CONV_CASES = [
    (nn.Conv2d, (3, 2, 6, 6), dict(kernel_size=3), True),
    (nn.Conv2d, (3, 2, 7, 7), dict(kernel_size=3, stride=2, padding=1), True),
    (
        nn.Conv2d,
        (2, 2, 7, 6),
        dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        True,
    ),
    (nn.Conv2d, (3, 2, 5, 5), dict(kernel_size=2, padding=1, dilation=2), False),
    (nn.Conv1d, (3, 2, 8), dict(kernel_size=3), True),
    (nn.Conv1d, (3, 2, 11), dict(kernel_size=3, stride=2, padding=2, dilation=2), False),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "cls,shape,kw,bias",
    CONV_CASES,
    ids=[f"{c.__name__}-{i}" for i, (c, *_r) in enumerate(CONV_CASES)],
)
def test_conv_factors_and_preconditioned_grad(cls, shape, kw, bias, reduction: str) -> None:
    torch.manual_seed(3)
    conv = cls(2, 3, bias=bias, **kw).double()
    T = conv(torch.zeros(*shape, dtype=torch.float64))[0, 0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * T, 4)).double()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 4, (shape[0],))
    damping = 0.01
    pre, brute, raw = one_step(
        model, x, y, _ce(reduction), ["0", "3"], damping=damping, loss_reduction=reduction
    )
    check_factors(pre, brute)
    check_preconditioned(pre, model, raw, damping, "eigen")


# --------------------------------------------------------------------------------------------
# KL clipping


@pytest.mark.parametrize("kl_clip", [1e-7, 1e3], ids=["clipped", "unclipped"])
def test_kl_clip_equals_formula(kl_clip: float) -> None:
    """nu = min(1, sqrt(c / |sum_l lr_l^2 sum(P_l * grad_l)|)), lr from each layer's param group."""
    torch.manual_seed(4)
    model = _mlp()
    lrs = {"0": 0.1, "2": 0.3}
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": lrs["0"]},
            {"params": model[2].parameters(), "lr": lrs["2"]},
        ]
    )
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    damping = 0.02
    pre, _brute, raw = one_step(
        model, x, y, F.cross_entropy, ["0", "2"], optimizer=opt, damping=damping, kl_clip=kl_clip
    )
    factors = pre.factors()
    P = {n: D.eigen_precondition(*factors[n], raw[n], damping) for n in raw}
    nu = D.kl_clip_factor([(P[n], raw[n], lrs[n]) for n in raw], kl_clip)
    assert (nu < 0.5) if kl_clip < 1 else (nu == 1.0)
    check_preconditioned(pre, model, raw, damping, "eigen", scale=nu)


# --------------------------------------------------------------------------------------------
# deep linear network, layer by layer


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_deep_linear_network_layer_by_layer(method: str) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 5), nn.Linear(5, 5, bias=False), nn.Linear(5, 4), nn.Linear(4, 3)
    ).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    names = ["0", "1", "2", "3"]
    damping = 1e-3
    pre, brute, raw = one_step(
        model, x, y, F.mse_loss, names, damping=damping, compute_method=method
    )
    check_factors(pre, brute)
    check_preconditioned(pre, model, raw, damping, method)
