"""``step_rule="quadratic"`` (lightning_kfac/step_rule.py, core/quadratic_model.py).

Every check is against a dense float64 computation built here without the engine:

- the exact GGN ``C = J^T H J`` of the batch from ``torch.func.jacrev`` (J: output w.r.t. the
  preconditioned parameters) and ``torch.func.hessian`` (H: the loss w.r.t. the output), for a
  categorical, a Bernoulli (summed over features) and a Gaussian (mean) loss;
- the K-FAC direction ``Delta = -(A (x) G + lambda I)^-1 (grad + eta theta)`` per layer from the
  engine's factors by a dense solve;
- the 2 x 2 system of Martens & Grosse (2015, sec. 7) solved by ``torch.linalg.solve``:
  alpha, mu, M(delta) and the parameters' move ``alpha Delta + mu delta_0`` must match;
- the LM update (sec. 6.5) from a direct evaluation of ``rho``;
- the Lightning path: the preconditioned parameters move by exactly ``alpha Delta + mu delta_0``
  and the optimizer (SGD with momentum and weight decay) leaves them alone, while a skipped layer
  gets the optimizer's ordinary step.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_kfac import KFACPreconditioner
from lightning_kfac.core import damping as dmp
from lightning_kfac.core.quadratic_model import solve_step
from tests.support import dense as D

EXACT = dict(
    factor_update_steps=1, inv_update_steps=1, kl_clip=None, low_rank=False, step_rule="quadratic"
)
LOSSES = {
    "categorical": lambda out, y: F.cross_entropy(out, y),
    "bernoulli": lambda out, y: (
        F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1).mean()
    ),
    "gaussian": lambda out, y: F.mse_loss(out, y),
}


def _network():
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).double()


def _problem(loss_name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _network()
    x = torch.randn(12, 4, dtype=torch.float64)
    if loss_name == "categorical":
        y = torch.randint(0, 3, (12,))
    elif loss_name == "bernoulli":
        y = torch.rand(12, 3, dtype=torch.float64)
    else:
        y = torch.randn(12, 3, dtype=torch.float64)
    return model, x, y, LOSSES[loss_name]


def _dense_ggn(state, x, y, loss_fn, names):
    """``J^T H J`` over the parameters ``names`` (flattened in that order), float64, on a
    hook-free network holding the parameters ``state``."""
    model = _network()
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def output(theta):
        chunks = torch.split(theta, [math.prod(s) for s in shapes])
        override = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, override, (x,))

    f = output(flat).detach()
    J = jacrev(lambda th: output(th).reshape(-1))(flat)
    H = hessian(lambda v: loss_fn(v.reshape(f.shape), y))(f.reshape(-1))
    return (J.T @ H @ J).detach()


def _dense_direction(pre, model, grads, names):
    """``-(A (x) G + lambda I)^-1 g~`` per layer, flattened like ``names`` (weight, bias)."""
    factors = pre.factors()
    out = []
    for layer in dict.fromkeys(n.rsplit(".", 1)[0] for n in names):
        A, G = factors[layer]
        gw = D.weight_matrix(grads[f"{layer}.weight"], grads[f"{layer}.bias"])
        P = D.eigen_precondition(A, G, gw, pre.damping)
        out += [-P[:, :-1].reshape(-1), -P[:, -1]]
    return torch.cat(out)


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_alpha_mu_and_model_equal_the_dense_quadratic_model(loss_name):
    """Three steps (1 x 1 model, then 2 x 2 with delta_0), eta from SGD's weight_decay, the last
    layer skipped: it keeps the optimizer's step, the others move by alpha Delta + mu delta_0."""
    model, x, y, loss_fn = _problem(loss_name)
    lr, wd, lam = 0.05, 1e-2, 0.2
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    pre = KFACPreconditioner(model, damping=lam, skip_layers=["^4$"], **EXACT)
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    previous = torch.zeros(
        sum(p.numel() for n, p in model.named_parameters() if n in names), dtype=torch.float64
    )
    for step in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        pre.step(opt, closure=lambda: loss_fn(model(x), y))
        moved = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        after = {n: p.detach().clone() for n, p in model.named_parameters()}

        theta = _flat(before, names)
        g = _flat(grads, names) + wd * theta
        eff = {n: grads[n] + wd * before[n] for n in names}
        Delta = _dense_direction(pre, model, eff, names)
        C = _dense_ggn(before, x, y, loss_fn, names)
        Cd = C + (lam + wd) * torch.eye(C.shape[0], dtype=torch.float64)
        if step == 0:
            K = (Delta @ Cd @ Delta).reshape(1, 1)
            b = (g @ Delta).reshape(1)
        else:
            V = torch.stack([Delta, previous], 1)
            K, b = V.T @ Cd @ V, V.T @ g
        x_ref = torch.linalg.solve(K, -b)
        alpha, mu = float(x_ref[0]), (float(x_ref[1]) if step else 0.0)
        m_ref = float(0.5 * x_ref @ K @ x_ref + b @ x_ref)
        last = pre.step_rule.last
        assert last["alpha"] == pytest.approx(alpha, rel=1e-9)
        assert last["mu"] == pytest.approx(mu, rel=1e-9, abs=1e-14)
        assert last["model_change"] == pytest.approx(m_ref, rel=1e-9)
        assert m_ref < 0
        delta = alpha * Delta + mu * previous
        assert D.rel_err(_flat(moved, names) - theta, delta) <= 1e-9
        # the optimizer left them alone (no grad, no state); the skipped layer got SGD's step
        assert torch.equal(_flat(after, names), _flat(moved, names))
        assert all(p.grad is None for n, p in model.named_parameters() if n in names)
        assert not any(
            id(p) in map(id, opt.state) for n, p in model.named_parameters() if n in names
        )
        if step == 0:
            for n in ("4.weight", "4.bias"):
                expected = before[n] - lr * (grads[n] + wd * before[n])
                assert torch.allclose(after[n], expected, rtol=0, atol=1e-15)
        previous = delta


def test_levenberg_marquardt_rho_and_damping_equal_a_direct_evaluation():
    """rho = (h(theta + delta) - h(theta)) / (M(delta) - 1/2 lambda |delta|^2), with
    h = loss + eta/2 |theta|^2; lambda moves by omega or 1/omega on the adaptation steps only."""
    model, x, y, loss_fn = _problem("bernoulli", seed=1)
    wd, omega = 1e-3, (19 / 20) ** 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=wd)
    pre = KFACPreconditioner(
        model, damping=0.05, adaptive_damping=True, adaptive_damping_interval=2, **EXACT
    )
    names = [n for n, _ in model.named_parameters()]

    def h():
        with torch.no_grad():
            return float(loss_fn(model(x), y)) + 0.5 * wd * sum(
                float(p.square().sum()) for p in model.parameters()
            )

    moved = []
    for step in range(4):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        lam = pre.damping
        h_before = h()
        before = _flat(dict(model.named_parameters()), names).detach().clone()
        pre.step(opt, closure=lambda: loss_fn(model(x), y))
        delta = _flat(dict(model.named_parameters()), names).detach() - before
        last = pre.step_rule.last
        if step % 2:
            assert math.isnan(last["rho"]) and pre.damping == lam
            continue
        rho = (h() - h_before) / (last["model_change"] - 0.5 * lam * float(delta @ delta))
        assert last["rho"] == pytest.approx(rho, rel=1e-9)
        assert pre.damping == pytest.approx(dmp.lm_update(lam, rho, omega), rel=1e-12)
        moved.append(pre.damping != lam)
    assert moved == [False, True]  # rho 0.50 keeps lambda, rho 1.24 lowers it


def test_solve_step_cases():
    K = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.3], dtype=torch.float64)
    sol = solve_step(K, b)
    ref = torch.linalg.solve(K, -b)
    assert (sol.alpha, sol.mu) == pytest.approx((float(ref[0]), float(ref[1])), rel=1e-14)
    assert sol.model_change == pytest.approx(float(0.5 * ref @ K @ ref + b @ ref), rel=1e-14)
    # delta_0 parallel to Delta: the 1-D minimiser, the same minimum over the (1-D) span
    par = torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64)
    sol = solve_step(par, torch.tensor([-1.0, -2.0], dtype=torch.float64))
    assert (sol.ok, sol.alpha, sol.mu) == (True, 0.5, 0.0)
    assert sol.model_change == pytest.approx(-0.25)
    for bad in ([[-1.0, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]], [[math.nan, 0], [0, 1]]):
        sol = solve_step(torch.tensor(bad, dtype=torch.float64), b)
        assert not sol.ok and (sol.alpha, sol.mu) == (0.0, 0.0) and sol.reason


def test_non_positive_model_moves_nothing_counts_and_warns():
    """A loss concave in the output (negative curvature beats tiny damping): no move, counted."""
    model, x, y, _ = _problem("gaussian")
    loss_fn = lambda out, y: -out.square().mean()  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, damping=1e-8, **EXACT)
    loss_fn(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="moved no preconditioned parameter"):
        pre.step(opt, closure=lambda: loss_fn(model(x), y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert pre.counters["step_rule_skipped"] == 1 and pre.step_rule.previous == {}


def test_replays_leave_rng_and_buffers_alone_and_errors_are_clear():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)
    ).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, damping=0.1, **EXACT)
    F.cross_entropy(model(x), y).backward()
    rng = torch.get_rng_state()
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    with pytest.raises(ValueError, match="closure=None"):
        pre.step(opt)
    pre.step(opt, closure=lambda: F.cross_entropy(model(x), y))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])
    assert pre.step_rule.last["model_change"] < 0
    # the output module must run exactly once per re-computed loss
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        pre.step(opt, closure=lambda: F.cross_entropy(model(x), y) + 0 * model(x).sum())


def _run(steps, state=None):
    model, x, y, loss_fn = _problem("categorical", seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        model, damping=0.1, adaptive_damping=True, adaptive_damping_interval=1, **EXACT
    )
    if state is not None:
        model.load_state_dict(state["model"])
        pre.load_state_dict(state["kfac"])
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step(opt, closure=lambda: loss_fn(model(x), y))
        opt.step()
    return model, pre


def test_resume_is_bit_identical():
    full, _ = _run(4)
    half, pre = _run(2)
    state = {
        "model": {k: v.clone() for k, v in half.state_dict().items()},
        "kfac": pre.state_dict(),
    }
    assert set(state["kfac"]["step_rule"]["previous"]) == {n for n, _ in half.named_parameters()}
    resumed, _ = _run(2, state)
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_output_module_submodule_gives_the_same_steps():
    """output_module='4' (the last Linear, so the network before it re-runs with detached
    parameters in the Hessian pass) and None (the model's own output) are the same model."""
    results = []
    for output_module in (None, "4"):
        model, x, y, loss_fn = _problem("bernoulli", seed=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        pre = KFACPreconditioner(model, damping=0.1, output_module=output_module, **EXACT)
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            pre.step(opt, closure=lambda: loss_fn(model(x), y))
        results.append((pre.step_rule.last, [p.detach().clone() for p in model.parameters()]))
    (a, pa), (b, pb) = results
    assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-12) and a["mu"] != 0.0
    assert a["mu"] == pytest.approx(b["mu"], rel=1e-12)
    assert all(torch.allclose(u, v, rtol=0, atol=1e-14) for u, v in zip(pa, pb))
