"""Warm-up and per-layer-group overrides, against brute-force factors (float64).

- ``warmup_steps=W``: for t < W the factors follow their clock but every gradient stays raw
  (``torch.equal``); at t = W the decompositions are refreshed from the warmed-up factors (not
  the ones of step 0), so the first preconditioned gradient is the dense solve with the current
  factors whatever ``inv_update_steps`` is.
- ``layer_overrides``: applied in order (later entries win), matched on the qualified name or
  the class name; each group gets its own damping and its own factor / decomposition clocks
  (running averages equal the brute-force ones over exactly that group's update steps);
  ``compute_method: skip`` leaves a layer raw and lists it in the summary.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core.discovery import layer_settings
from tests.support import dense as D

NAMES = ["0", "2"]


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(n)
    ]


def _train(model, pre, batches, names=NAMES):
    """Run the steps; per step: brute-force batch factors, raw and preconditioned grad W~."""
    modules = dict(model.named_modules())
    records = []
    for x, y in batches:
        model.zero_grad()
        with D.record(model, names) as store:
            F.cross_entropy(model(x), y).backward()
        brute = D.brute_factors(model, store)
        raw = {n: D.grad_matrix(modules[n]) for n in names}
        pre.step()
        records.append((brute, raw, {n: D.grad_matrix(modules[n]) for n in names}))
    return records


def _running(estimates, steps, decay):
    """The running average of docs/conventions.md over the given steps: first
    sets, later decay-average."""
    A = G = None
    for t in steps:
        a, g = estimates[t]
        A, G = (a, g) if A is None else (decay * A + (1 - decay) * a, decay * G + (1 - decay) * g)
    return A, G


def test_warmup_leaves_gradients_raw_and_refreshes_decompositions_at_its_end():
    model = _mlp()
    pre = KFACPreconditioner(
        model,
        damping=0.05,
        warmup_steps=3,
        factor_update_steps=1,
        inv_update_steps=100,
        factor_decay=0.5,
        kl_clip=None,
    )
    records = _train(model, pre, _batches(5))
    for t in range(3):
        _, raw, after = records[t]
        assert all(torch.equal(raw[n], after[n]) for n in NAMES), t
    assert pre.counters["factor_updates"] == 2 * 5  # factors estimated during warm-up too
    for t in (3, 4):
        for name in NAMES:
            A, G = _running([r[0][name] for r in records], range(4), 0.5)  # factors as of step 3
            P_ref = D.eigen_precondition(A, G, records[t][1][name], 0.05)
            assert D.rel_err(records[t][2][name], P_ref) <= 1e-8, (t, name)


def test_warmup_zero_keeps_the_contract_clock():
    """Without warm-up step 0 preconditions with the step-0 decomposition, kept until step 100."""
    model = _mlp()
    pre = KFACPreconditioner(
        model,
        damping=0.05,
        factor_update_steps=1,
        inv_update_steps=100,
        factor_decay=0.5,
        kl_clip=None,
    )
    records = _train(model, pre, _batches(3))
    for t in range(3):
        for name in NAMES:
            A0, G0 = records[0][0][name]
            P_ref = D.eigen_precondition(A0, G0, records[t][1][name], 0.05)
            assert D.rel_err(records[t][2][name], P_ref) <= 1e-8, (t, name)
    assert pre.counters["decompositions"] == 2


def test_overrides_apply_in_order_by_name_or_class():
    cfg = KFACConfig(
        damping=1e-3,
        layer_overrides=[
            {"regex": "Linear", "damping": 0.1, "inv_update_steps": 20},
            {"regex": r"^head\.", "damping": 0.2, "compute_method": "inverse"},
            {"regex": r"^head\.out$", "compute_method": "skip"},
        ],
    )
    assert layer_settings(cfg, "body.0", "Linear") == dict(
        damping=0.1, factor_update_steps=10, inv_update_steps=20, compute_method="eigen"
    )
    assert layer_settings(cfg, "head.fc", "Linear") == dict(
        damping=0.2, factor_update_steps=10, inv_update_steps=20, compute_method="inverse"
    )
    assert layer_settings(cfg, "head.out", "Linear")["compute_method"] == "skip"
    assert layer_settings(cfg, "conv", "Conv2d") == dict(
        damping=1e-3, factor_update_steps=10, inv_update_steps=100, compute_method="eigen"
    )


def test_group_clocks_and_dampings_equal_brute_force():
    """Layer "0": factors every 2 steps, decompositions every 4, damping 0.5 (eigen);
    layer "2": factors every step, decompositions every 3, inverse with the global damping."""
    model = _mlp()
    decay = 0.7
    pre = KFACPreconditioner(
        model,
        damping=0.02,
        factor_decay=decay,
        kl_clip=None,
        factor_update_steps=1,
        inv_update_steps=1,
        layer_overrides=[
            {"regex": "^0$", "damping": 0.5, "factor_update_steps": 2, "inv_update_steps": 4},
            {"regex": "^2$", "inv_update_steps": 3, "compute_method": "inverse"},
        ],
    )
    blocks = pre.layers
    assert (
        blocks["0"].damping,
        blocks["0"].factor_update_steps,
        blocks["0"].inv_update_steps,
        blocks["0"].compute_method,
    ) == (0.5, 2, 4, "eigen")
    assert (
        blocks["2"].damping,
        blocks["2"].factor_update_steps,
        blocks["2"].inv_update_steps,
        blocks["2"].compute_method,
    ) == (0.02, 1, 3, "inverse")
    steps = 7
    records = _train(model, pre, _batches(steps))
    est = {n: [r[0][n] for r in records] for n in NAMES}
    clocks = {"0": (2, 4, 0.5, D.eigen_precondition), "2": (1, 3, 0.02, D.inverse_precondition)}
    for name, (f_every, inv_every, lam, solve) in clocks.items():
        A, G = _running(est[name], range(0, steps, f_every), decay)
        got_A, got_G = pre.factors()[name]
        assert D.rel_err(got_A, A) <= 1e-10 and D.rel_err(got_G, G) <= 1e-10, name
        for t in range(steps):
            last_inv = t - t % inv_every
            A_t, G_t = _running(est[name], range(0, last_inv + 1, f_every), decay)
            P_ref = solve(A_t, G_t, records[t][1][name], lam)
            assert D.rel_err(records[t][2][name], P_ref) <= 1e-8, (name, t)


def test_skip_override_leaves_the_layer_raw_and_listed():
    model = _mlp()
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        layer_overrides=[{"regex": "^2$", "compute_method": "skip"}],
    )
    assert list(pre.layers) == ["0"]
    assert [(s.name, s.reason) for s in pre.skipped] == [
        ("2", "layer_overrides: compute_method=skip")
    ]
    assert "skipped: layer_overrides: compute_method=skip" in pre.summary()
    records = _train(model, pre, _batches(2))
    for _brute, raw, after in records:
        assert torch.equal(raw["2"], after["2"])
        assert not torch.equal(raw["0"], after["0"])
    assert set(pre.factors()) == {"0"}


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_group_damping_with_relative_mode_and_state_round_trip(mode):
    """A group's damping is relative too; block dampings and clocks survive a state round trip."""
    model = _mlp()
    opts = dict(
        damping=0.01,
        damping_mode=mode,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        layer_overrides=[{"regex": "^2$", "damping": 0.3}],
    )
    pre = KFACPreconditioner(model, **opts)
    records = _train(model, pre, _batches(1))
    for name, lam in (("0", 0.01), ("2", 0.3)):
        A, G = pre.factors()[name]
        if mode == "relative":
            lam *= float(torch.trace(A) / A.shape[0]) * float(torch.trace(G) / G.shape[0])
        P_ref = D.eigen_precondition(A, G, records[0][1][name], lam)
        assert D.rel_err(records[0][2][name], P_ref) <= 1e-8, name
    pre2 = KFACPreconditioner(_mlp(), **opts)
    pre2.load_state_dict(pre.state_dict())
    assert {n: b.damping for n, b in pre2.layers.items()} == {"0": 0.01, "2": 0.3}
    for name in NAMES:
        for k, v in pre.layers[name].decomposition.items():
            assert torch.equal(pre2.layers[name].decomposition[k], v), (name, k)
