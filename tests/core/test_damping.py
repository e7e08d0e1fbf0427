"""Damping over time (core/damping.py): schedules, Levenberg-Marquardt adaptation, relative mode.

- Schedules (constant / exponential / step) on the optimizer-step clock: the damping in use at
  step t equals the formula, and the preconditioned gradient equals the dense solve with it.
- LM rule (Martens & Grosse 2015, sec. 6.5): ``M(delta)`` equals its dense brute force
  ``g.d + 1/2 d^T (A (x) G + lambda I) d`` (float64); on a least-squares layer whose K-FAC
  curvature is ``c^2`` times the exact Hessian, ``rho -> 2 - 1/c^2`` (lambda -> 0), so c = 1
  (the model predicts well) lowers the damping, c^2 = 2/3 keeps it, c = 0.3 (overshoot) raises it.
- Relative damping: with a digits autoencoder, BCE averaged over the 64 pixels makes G 64^2
  times smaller than BCE summed over pixels; one relative damping value gives the same update
  (up to the loss scale 64) for both, one absolute value does not.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core import damping as dmp
from tests.support import dense as D

EXACT = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None)


# --------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("damping_schedule", "cosine", "damping_schedule='cosine'"),
        ("damping_decay", 0.0, "damping_decay=0.0"),
        ("damping_decay", 1.5, "damping_decay=1.5"),
        ("damping_step_size", 0, "damping_step_size=0"),
        ("adaptive_damping", "yes", "adaptive_damping='yes'"),
        ("adaptive_damping_interval", 0, "adaptive_damping_interval=0"),
        ("adaptive_damping_factor", 1.0, "adaptive_damping_factor=1.0"),
        ("min_damping", -1e-3, "min_damping=-0.001"),
        ("max_damping", 0.0, "max_damping=0.0"),
    ],
)
def test_bad_damping_options_name_option_and_value(option, value, needle):
    with pytest.raises(
        ValueError, match="Invalid " + needle.replace("(", r"\(").replace(".", r"\.")
    ):
        KFACConfig(**{option: value})


def test_damping_cross_checks():
    with pytest.raises(ValueError, match=r"Invalid damping=0\.001: must lie within"):
        KFACConfig(damping=1e-3, min_damping=1e-2)
    with pytest.raises(ValueError, match=r"Invalid damping_schedule='step'.*adaptive_damping"):
        KFACConfig(adaptive_damping=True, damping_schedule="step")
    with pytest.raises(ValueError, match=r"Invalid loss_reduction='sum'.*adaptive_damping"):
        KFACConfig(adaptive_damping=True, loss_reduction="sum")
    cfg = KFACConfig(damping_schedule="EXPONENTIAL", adaptive_damping_factor=0.5)
    assert cfg.to_dict()["damping_schedule"] == "exponential"
    assert KFACConfig(**cfg.to_dict()) == cfg  # serializable by name and numbers


# --------------------------------------------------------------------------------------------
# schedules


def test_schedule_formulas_and_clamp():
    cfg = KFACConfig(
        damping=1.0,
        damping_schedule="exponential",
        damping_decay=0.5,
        damping_step_size=4,
        min_damping=0.1,
    )
    assert [dmp.scheduled_damping(cfg, t) for t in (0, 2, 4, 8)] == [1.0, 0.5**0.5, 0.5, 0.25]
    assert dmp.scheduled_damping(cfg, 40) == 0.1  # clamped at min_damping
    step = KFACConfig(damping=1.0, damping_schedule="step", damping_decay=0.5, damping_step_size=4)
    assert [dmp.scheduled_damping(step, t) for t in (0, 3, 4, 7, 8)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert dmp.scheduled_damping(KFACConfig(damping=0.3), 10**6) == 0.3


@pytest.mark.parametrize("schedule", ["constant", "exponential", "step"])
def test_scheduled_damping_is_used_on_the_optimizer_step_clock(schedule):
    """At step t the eigen method applies (A (x) G + lambda_t I)^-1, layer
    overrides scaled alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    pre = KFACPreconditioner(
        model,
        damping=0.2,
        damping_schedule=schedule,
        damping_decay=0.5,
        damping_step_size=2,
        factor_decay=0.5,
        layer_overrides=[{"regex": "^2$", "damping": 0.05}],
        **EXACT,
    )
    base = {"0": 0.2, "2": 0.05}
    for t in range(5):
        x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = {n: D.grad_matrix(model[int(n)]) for n in base}
        pre.step()
        expected = {"constant": 1.0, "exponential": 0.5 ** (t / 2), "step": 0.5 ** (t // 2)}[
            schedule
        ]
        assert pre.damping == pytest.approx(0.2 * expected, rel=1e-14)
        assert pre.last_stats["damping"] == pre.damping
        factors = pre.factors()
        for name, lam in base.items():
            A, G = factors[name]
            P_ref = D.eigen_precondition(A, G, raw[name], lam * expected)
            assert D.rel_err(D.grad_matrix(model[int(name)]), P_ref) <= 1e-8, (t, name)


# --------------------------------------------------------------------------------------------
# the quadratic model and the LM rule


def test_lm_rule_thresholds():
    w = 0.9
    assert dmp.lm_update(1.0, 0.8, w) == 0.9
    assert dmp.lm_update(1.0, 0.5, w) == 1.0
    assert dmp.lm_update(1.0, 0.1, w) == pytest.approx(1 / 0.9)
    assert dmp.lm_update(1.0, -math.inf, w) == pytest.approx(1 / 0.9)
    assert dmp.lm_update(1.0, math.nan, w) == 1.0
    assert dmp.omega(KFACConfig(adaptive_damping_interval=5)) == pytest.approx((19 / 20) ** 5)


def test_quadratic_model_equals_dense_brute_force():
    """M(delta) = sum_blocks [g.d + 1/2 d^T (A (x) G + lambda I) d] + g.d for the other params.

    Adam makes delta differ from the preconditioned direction; layer "2" is skipped, so it
    enters to first order only; relative damping scales lambda per layer.
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    pre = KFACPreconditioner(
        model,
        damping=0.3,
        damping_mode="relative",
        adaptive_damping=True,
        adaptive_damping_interval=1,
        skip_layers=["^2$"],
        **EXACT,
    )
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    raw = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pre.step(opt)
    opt.step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    A, G = pre.factors()["0"]
    lam = 0.3 * float(torch.trace(A) / 6) * float(torch.trace(G) / 4)  # relative: x tr/dim
    g0 = D.weight_matrix(raw["0.weight"], raw["0.bias"])
    d0 = D.weight_matrix(delta["0.weight"], delta["0.bias"])
    curv = torch.kron(A, G) + lam * torch.eye(24, dtype=torch.float64)
    ref = float(D.vec(g0) @ D.vec(d0) + 0.5 * D.vec(d0) @ curv @ D.vec(d0))
    ref += float(
        (raw["2.weight"] * delta["2.weight"]).sum() + (raw["2.bias"] * delta["2.bias"]).sum()
    )
    got = pre.damping_control.model_decrease()
    assert got == pytest.approx(ref, rel=1e-10)
    with torch.no_grad():
        after = F.cross_entropy(model(x), y)
    rho = pre.update_damping(loss, after)
    assert rho == pytest.approx((float(after) - float(loss.detach())) / ref, rel=1e-8)


def _least_squares_case(c: float, damping: float = 1e-9, seed: int = 2):
    """One Linear layer, L = mean_n 1/2 |W~ a_n - y_n|^2, residuals with (1/N) R^T R = c^2 I.

    The exact Hessian is A (x) I and K-FAC's is A (x) G = c^2 (A (x) I); with SGD(lr=1) the step
    is delta = -(c^2 H + lambda)^-1 g, so rho = 2 - 1/c^2 in the limit lambda -> 0.
    """
    torch.manual_seed(seed)
    N, d_in, d_out = 40, 3, 2
    layer = nn.Linear(d_in, d_out).double()
    x = torch.randn(N, d_in, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(N, d_out, dtype=torch.float64))
    with torch.no_grad():
        y = layer(x) - c * math.sqrt(N) * Q

    def loss_fn():
        return 0.5 * (layer(x) - y).square().sum(1).mean()

    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    pre = KFACPreconditioner(
        layer, damping=damping, adaptive_damping=True, adaptive_damping_interval=3, **EXACT
    )
    loss = loss_fn()
    loss.backward()
    pre.step(opt)
    _, G = pre.factors()[""]
    assert D.rel_err(G, c * c * torch.eye(d_out, dtype=torch.float64)) <= 1e-12
    opt.step()
    return pre, loss, loss_fn


@pytest.mark.parametrize("c2,direction", [(1.0, "down"), (2 / 3, "same"), (0.09, "up")])
def test_adaptive_damping_lowers_when_model_predicts_well_and_raises_on_overshoot(c2, direction):
    pre, loss, loss_fn = _least_squares_case(math.sqrt(c2))
    omega = (19 / 20) ** 3
    rho = pre.update_damping(loss, loss_fn)
    assert rho == pytest.approx(2 - 1 / c2, abs=1e-6)
    factor = {"down": omega, "same": 1.0, "up": 1 / omega}[direction]
    assert pre.damping == pytest.approx(1e-9 * factor, rel=1e-12)
    assert pre.damping_control.last_rho == rho
    assert not pre.adaptation_pending


def test_overshoot_to_non_finite_loss_raises_damping_and_zero_step_keeps_it():
    pre, loss, _ = _least_squares_case(1.0, damping=1e-3)
    assert pre.update_damping(loss, float("inf")) == -math.inf
    assert pre.damping == pytest.approx(1e-3 / (19 / 20) ** 3)
    # lr = 0: delta = 0, M(delta) = 0, no information: damping unchanged, rho nan
    torch.manual_seed(3)
    layer = nn.Linear(3, 2).double()
    pre = KFACPreconditioner(layer, damping=1e-3, adaptive_damping=True, **EXACT)
    x = torch.randn(5, 3, dtype=torch.float64)
    layer(x).square().mean().backward()
    pre.step(torch.optim.SGD(layer.parameters(), lr=0.0))
    assert math.isnan(pre.update_damping(1.0, 0.5))
    assert pre.damping == 1e-3


def test_adaptation_clock_closure_calls_and_bounds():
    """Adapt on steps 0, 2, 4 only (the closure is not evaluated elsewhere); clamp at min."""
    torch.manual_seed(4)
    layer = nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        layer,
        damping=1e-2,
        adaptive_damping=True,
        adaptive_damping_interval=2,
        adaptive_damping_factor=0.5,
        min_damping=4e-3,
        **EXACT,
    )
    calls, rhos = [], []

    def closure():
        calls.append(pre.steps - 1)
        return F.mse_loss(layer(x), y)

    for _ in range(6):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y)
        loss.backward()
        pre.step(opt)
        opt.step()
        rhos.append(pre.update_damping(loss, closure))
    assert calls == [0, 2, 4]
    assert [r is None for r in rhos] == [False, True, False, True, False, True]
    assert rhos[0] > 0.75  # small steps on a quadratic: the model predicts well
    assert pre.damping == 4e-3  # 1e-2 -> 5e-3 -> clamped at min_damping
    assert pre.damping_control.adaptations == 3


def test_missing_update_damping_call_warns_once():
    layer = nn.Linear(2, 2).double()
    pre = KFACPreconditioner(layer, adaptive_damping=True, adaptive_damping_interval=1, **EXACT)
    x = torch.randn(4, 2, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="update_damping"):
        for _ in range(3):
            layer.zero_grad()
            layer(x).square().mean().backward()
            pre.step()


def _adaptive_run(steps, state=None, resume_at=None):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    opts = dict(
        damping=1e-2,
        adaptive_damping=True,
        adaptive_damping_interval=2,
        factor_update_steps=1,
        inv_update_steps=3,
        kl_clip=1e-2,
    )
    pre = KFACPreconditioner(model, **opts)
    g = torch.Generator().manual_seed(6)
    data = [
        (
            torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(steps)
    ]
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        pre.load_state_dict(state["pre"])
        start = resume_at
    saved, dampings = None, []
    for t in range(start, steps):
        if t == resume_at and state is None:
            saved = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "opt": opt.state_dict(),
                "pre": pre.state_dict(),
            }
            import copy

            saved = copy.deepcopy(saved)
        x, y = data[t]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step(opt)
        opt.step()
        pre.update_damping(loss, lambda: F.cross_entropy(model(x), y))
        dampings.append(pre.damping)
    return model, pre, saved, dampings


def test_adapted_damping_resumes_bit_identically(tmp_path):
    model, pre, saved, dampings = _adaptive_run(10, resume_at=5)
    assert len(set(dampings)) > 1  # the damping did move
    path = tmp_path / "state.pt"
    torch.save(saved, path)
    state = torch.load(path, weights_only=True)
    model2, pre2, _, dampings2 = _adaptive_run(10, state=state, resume_at=5)
    assert dampings2 == dampings[5:]
    assert pre2.damping == pre.damping
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n


# --------------------------------------------------------------------------------------------
# relative damping: one value for mean- and sum-reduced pixel losses (digits autoencoder)

PIXELS = 64


def _digits(n=32):
    from sklearn.datasets import load_digits

    data = torch.tensor(load_digits().data[:n], dtype=torch.float64) / 16.0
    return data


def _autoencoder_run(pixel_reduction, mode, damping, lr, steps=4):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(PIXELS, 12), nn.Tanh(), nn.Linear(12, PIXELS)).double()
    x = _digits()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pre = KFACPreconditioner(model, damping=damping, damping_mode=mode, factor_decay=0.8, **EXACT)
    first = None
    for t in range(steps):
        batch = x[8 * t : 8 * t + 8]
        opt.zero_grad()
        logits = model(batch)
        if pixel_reduction == "mean":  # mean over examples and pixels
            loss = F.binary_cross_entropy_with_logits(logits, batch)
        else:  # sum over pixels, mean over examples
            loss = F.binary_cross_entropy_with_logits(logits, batch, reduction="sum") / len(batch)
        loss.backward()
        pre.step(opt)
        if first is None:
            first = {n: D.grad_matrix(model[int(n)]) for n in ("0", "2")}
            first["G"] = pre.factors()["2"][1]
        opt.step()
    return model, pre, first


def test_relative_damping_is_invariant_to_averaging_over_pixels():
    """G(mean over pixels) = G(sum) / 64^2 and grad(mean) = grad(sum) / 64, so with relative
    damping P(mean) = 64 P(sum) exactly, and SGD with lr(sum) = 64 lr(mean) follows the same
    trajectory. With the same absolute damping neither holds."""
    lam, lr = 1e-3, 0.02
    ref = {}
    for mode in ("relative", "absolute"):
        m_mean, _pre_mean, p_mean = _autoencoder_run("mean", mode, lam, lr)
        m_sum, _pre_sum, p_sum = _autoencoder_run("sum", mode, lam, lr * PIXELS)
        G_mean, G_sum = p_mean.pop("G"), p_sum.pop("G")  # after the first step
        assert D.rel_err(G_mean * PIXELS**2, G_sum) <= 1e-10  # the scale the test is about
        ref[mode] = (
            max(D.rel_err(p_mean[n], PIXELS * p_sum[n]) for n in p_mean),
            max(D.rel_err(a, b) for a, b in zip(m_mean.parameters(), m_sum.parameters())),
        )
    assert ref["relative"][0] <= 1e-9 and ref["relative"][1] <= 1e-9, ref
    assert ref["absolute"][0] >= 0.1 and ref["absolute"][1] >= 1e-3, ref


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_relative_damping_formula(method):
    """Relative damping = lambda (tr A/dim A)(tr G/dim G): the dense solve (eigen) or the
    factored form with that absolute value (inverse)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    pre = KFACPreconditioner(
        model, damping=0.1, damping_mode="relative", compute_method=method, **EXACT
    )
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    F.cross_entropy(model(x), y).backward()
    raw = {n: D.grad_matrix(model[int(n)]) for n in ("0", "2")}
    pre.step()
    solve = D.eigen_precondition if method == "eigen" else D.inverse_precondition
    for name, (A, G) in pre.factors().items():
        lam = 0.1 * float(torch.trace(A) / A.shape[0]) * float(torch.trace(G) / G.shape[0])
        P_ref = solve(A, G, raw[name], lam)
        assert D.rel_err(D.grad_matrix(model[int(name)]), P_ref) <= 1e-8, name


# --------------------------------------------------------------------------------------------
# adaptive damping through KFACCallback: re-evaluation of training_step after the step


def _lightning():
    pl = pytest.importorskip("pytorch_lightning")
    from tests.support import lightning as S

    return pl, S


ADAPTIVE = dict(
    damping=1e-2,
    adaptive_damping=True,
    adaptive_damping_interval=2,
    factor_update_steps=1,
    inv_update_steps=2,
    kl_clip=1e-2,
)


def test_callback_adaptive_damping_equals_hand_loop(tmp_path):
    """Trainer.fit == zero_grad; backward; pre.step; opt.step; pre.update_damping(loss, closure)
    on the same batches: same damping after every step and bit-identical parameters."""
    _pl, S = _lightning()
    from lightning_kfac import KFACCallback

    data = S.loader(S.make_dataset(8 * 8), batch_size=8)
    model = S.MLP(lr=0.5)
    reference = S.clone_module(model)
    callback = KFACCallback(**ADAPTIVE)
    seen = S.Recorder(lambda trainer, module: callback.preconditioner.damping)
    S.make_trainer(tmp_path, max_steps=8, callbacks=[callback, seen]).fit(model, data)

    pre = KFACPreconditioner(reference, **ADAPTIVE)
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    dampings = []
    for batch in data:
        opt.zero_grad()
        loss = reference.loss(batch)
        loss.backward()
        pre.step(opt)
        opt.step()
        pre.update_damping(loss, lambda: reference.loss(batch))
        dampings.append(pre.damping)
    assert seen.records == dampings
    assert len(set(dampings)) > 1
    assert callback.preconditioner.damping_control.adaptations == 4  # steps 0, 2, 4, 6
    S.assert_params_equal(model, reference)


def test_callback_reevaluation_has_no_side_effects(tmp_path):
    """Every step adapts, yet BatchNorm counts each batch once and the epoch mean of a logged
    metric is the mean of the training losses only."""
    pl, S = _lightning()
    from lightning_kfac import KFACCallback

    class LoggingBN(S.MLP):
        def __init__(self):
            super().__init__(lr=0.2)
            self.net = nn.Sequential(
                nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)
            ).double()

        def training_step(self, batch, batch_idx):
            loss = self.loss(batch)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            return loss

    class Losses(pl.Callback):
        values: ClassVar[list[float]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    model, losses = LoggingBN(), Losses()
    callback = KFACCallback(**dict(ADAPTIVE, adaptive_damping_interval=1))
    S.make_trainer(tmp_path, max_epochs=1, callbacks=[callback, losses]).fit(
        model, S.loader(S.make_dataset(4 * 8), batch_size=8)
    )
    assert callback.preconditioner.damping_control.adaptations == 4
    assert int(model.net[1].num_batches_tracked) == 4
    mean = sum(losses.values) / len(losses.values)
    assert float(model.trainer.callback_metrics["train_loss"]) == pytest.approx(mean, rel=1e-12)


def test_callback_adaptive_damping_refuses_manual_optimization(tmp_path):
    _pl, S = _lightning()
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_kfac import KFACCallback

    class Manual(S.MLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    with pytest.raises(MisconfigurationException, match=r"adaptive_damping=True\) needs automatic"):
        S.make_trainer(tmp_path, max_steps=1, callbacks=[KFACCallback(**ADAPTIVE)]).fit(
            Manual(), S.loader(S.make_dataset(8), 8)
        )


@pytest.mark.parametrize("adaptive", [False, True])
def test_resume_with_another_damping_option(adaptive):
    """The current options win for a constant damping (and a group's override); an adapted
    damping is state and continues where it was. Either way it is applied once, not twice."""
    layer = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    opts = dict(adaptive_damping=adaptive, adaptive_damping_interval=1, **EXACT)
    pre = KFACPreconditioner(layer, damping=1e-3, **opts)
    layer(x).square().mean().backward()
    pre.step()
    if adaptive:
        pre.damping_control.value = 7e-4  # as if adapted
    pre.remove()
    layer2 = nn.Linear(3, 2).double()
    pre2 = KFACPreconditioner(layer2, damping=1e-2, **opts)
    pre2.load_state_dict(pre.state_dict())
    expected = 7e-4 if adaptive else 1e-2
    assert pre2.damping == expected
    assert pre2._effective_damping(pre2.layers[""]) == pytest.approx(expected, rel=1e-15)
    layer2(x).square().mean().backward()
    raw = D.grad_matrix(layer2)
    pre2.step()
    A, G = pre2.factors()[""]
    assert D.rel_err(D.grad_matrix(layer2), D.eigen_precondition(A, G, raw, expected)) <= 1e-8
