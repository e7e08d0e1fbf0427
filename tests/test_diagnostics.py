"""Tests for ``lightning_kfac.diagnostics`` against dense brute force (``tests.support.dense``).

Everything runs in float64. The exact error is checked against ``torch.kron`` of the brute-force
factors and the Fisher block of ``torch.func`` per-example gradients; the probe estimate is
checked against the exact value within a tolerance derived from the probe variance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac.diagnostics import (
    diagnose,
    kronecker_error,
    mean_gradient,
    population_terms,
    record_rows,
    sampled_nll,
    to_scalars,
)
from tests.support import dense

DT = torch.float64


def _mlp(seed: int = 0, inplace: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=inplace), nn.Linear(5, 3)).to(DT)


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).to(DT)


def _ce(y):
    return lambda out: F.cross_entropy(out, y)


def _brute_error(model, x, y, layer):
    """``||M - A (x) G|| / ||M||`` from torch.func per-example grads and brute-force factors."""
    per_ex = dense.per_example_grads(model, F.cross_entropy, x, y, layer)
    M = dense.exact_fisher_block(per_ex)
    with dense.record(model, [layer]) as store:
        F.cross_entropy(model(x), y).backward()
    A, G = dense.brute_factors(model, store)[layer]
    model.zero_grad()
    K = torch.kron(A, G)
    return float(torch.linalg.norm(M - K) / torch.linalg.norm(M)), M, K


def test_one_example_error_is_zero():
    """With one example, M = (a a^T) (x) (g g^T) = A (x) G exactly (K-FAC is exact)."""
    model = _mlp()
    x, y = torch.randn(1, 4, dtype=DT), torch.tensor([2])
    rows = record_rows(model, x, _ce(y))
    assert set(rows) == {"0", "2"}
    for r in rows.values():
        assert kronecker_error(r.a, r.g, method="dense").relative <= 1e-10
        # The Gram route subtracts ||M||^2 - 2<K,M> + ||K||^2: resolved to ~sqrt(eps) only.
        assert kronecker_error(r.a, r.g, method="gram").relative <= 1e-6
        assert kronecker_error(r.a, r.g, method="probe", num_probes=8).relative <= 1e-6


@pytest.mark.parametrize("method,tol", [("dense", 1e-10), ("gram", 1e-7)])
def test_exact_error_equals_brute_force_linear(method, tol):
    model = _mlp(1)
    x, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    rows = record_rows(model, x, _ce(y))
    for layer in ("0", "2"):
        ref, _, _ = _brute_error(model, x, y, layer)
        assert ref > 1e-3  # not a trivially exact case
        got = kronecker_error(rows[layer].a, rows[layer].g, method=method)
        assert got.method == method
        assert abs(got.relative - ref) <= tol * max(1.0, ref)


@pytest.mark.parametrize("method,tol", [("dense", 1e-10), ("gram", 1e-7)])
def test_exact_error_equals_brute_force_conv(method, tol):
    """KFC conventions: J_n = sum_t g_{n,t} a_{n,t}^T, A = sum a a^T / B, G = sum g g^T / (BT)."""
    model = _cnn()
    x, y = torch.randn(5, 2, 4, 4, dtype=DT), torch.randint(0, 3, (5,))
    rows = record_rows(model, x, _ce(y))
    r = rows["0"]
    assert r.num_examples == 5 and r.rows_per_example == 16
    ref, _, _ = _brute_error(model, x, y, "0")
    got = kronecker_error(r.a, r.g, r.num_examples, method=method)
    assert abs(got.relative - ref) <= tol * max(1.0, ref)


def test_rows_give_contract_factors():
    """A = E[a a^T], G = E[g g^T] from the recorded rows equal the brute-force factors."""
    for model, x in (
        (_mlp(2), torch.randn(6, 3, 4, dtype=DT)),  # Linear on sequences: 18 rows
        (_cnn(2), torch.randn(4, 2, 4, 4, dtype=DT)),
    ):
        if x.dim() == 3:
            loss_fn = lambda out: out.pow(2).mean()  # noqa: E731
        else:
            loss_fn = _ce(torch.tensor([0, 1, 2, 0]))
        rows = record_rows(model, x, loss_fn)
        names = list(rows)
        with dense.record(model, names) as store:
            loss_fn(model(x)).backward()
        brute = dense.brute_factors(model, store)
        model.zero_grad()
        for name in names:
            r = rows[name]
            A = r.a.T @ r.a / r.num_examples
            G = r.g.T @ r.g / r.a.shape[0]
            assert dense.rel_err(A, brute[name][0]) <= 1e-12
            assert dense.rel_err(G, brute[name][1]) <= 1e-12


def _probe_sigma(M, K, k):
    """Standard deviations of the k-probe estimates of e2 = ||M-K||^2, m2 = ||M||^2, e/m.

    For standard normal v and symmetric S, Var(v^T S v) = 2 ||S||_F^2. With X = M - K,
    y_err = v^T X^2 v and y_blk = v^T M^2 v; the ratio r = e2/m2 has delta-method variance
    Var(y_err - r y_blk) / (k m2^2) = 2 ||X^2 - r M^2||_F^2 / (k m2^2), and sqrt(r) has
    std(r) / (2 sqrt(r)).
    """
    X = M - K
    P, Q = X @ X, M @ M
    e2, m2 = float((X * X).sum()), float((M * M).sum())
    r = e2 / m2
    s_e2 = math.sqrt(2 * float((P * P).sum()) / k)
    s_m2 = math.sqrt(2 * float((Q * Q).sum()) / k)
    s_rel = math.sqrt(2 * float(((P - r * Q) ** 2).sum()) / k) / m2 / (2 * math.sqrt(r))
    return e2, m2, math.sqrt(r), s_e2, s_m2, s_rel


@pytest.mark.parametrize("conv", [False, True])
def test_probe_estimate_agrees_with_exact(conv):
    """Probe estimates lie within 4 standard deviations (computed from the exact block) of the
    exact values: a two-sided 4-sigma band, i.e. a ~6e-5 chance of failure per check under a
    normal approximation of the 400-probe mean (the seed is fixed, so the test is deterministic).
    """
    model = _cnn(3) if conv else _mlp(3)
    B = 6 if conv else 12
    x = torch.randn(B, 2, 4, 4, dtype=DT) if conv else torch.randn(B, 4, dtype=DT)
    y = torch.randint(0, 3, (B,))
    rows = record_rows(model, x, _ce(y))
    k = 400
    for name, r in rows.items():
        _, M, K = _brute_error(model, x, y, name)
        e2, m2, rel, s_e2, s_m2, s_rel = _probe_sigma(M, K, k)
        est = kronecker_error(
            r.a,
            r.g,
            r.num_examples,
            method="probe",
            num_probes=k,
            generator=torch.Generator().manual_seed(11),
        )
        assert est.method == "probe" and est.probes == k
        assert abs(est.error_norm**2 - e2) <= 4 * s_e2
        assert abs(est.block_norm**2 - m2) <= 4 * s_m2
        assert abs(est.relative - rel) <= 4 * s_rel
        # The reported standard error estimates s_rel from the same probes (within 2x).
        assert 0.5 * s_rel <= est.std <= 2.0 * s_rel


def test_auto_picks_exact_then_probes():
    """ "auto": dense for small blocks, Gram formulas while O(B^2 (d_in + d_out)) is affordable,
    probes only beyond (documented thresholds)."""
    torch.manual_seed(0)
    small = kronecker_error(torch.randn(8, 5, dtype=DT), torch.randn(8, 3, dtype=DT))
    assert small.method == "dense" and small.probes == 0
    a, g = torch.randn(64, 80, dtype=DT), torch.randn(64, 40, dtype=DT)
    mid = kronecker_error(a, g)
    assert mid.method == "gram" and mid.probes == 0
    big = kronecker_error(torch.randn(20000, 40), torch.randn(20000, 30), num_probes=4)
    assert big.method == "probe" and big.probes == 4 and big.std > 0


def test_mean_gradient_is_bias_gradient_for_empirical_fisher():
    """Mean loss: E_n[g_n] = (1/N) sum_n N * grad_n = dL/db exactly."""
    model = _mlp(4)
    x, y = torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    rows = record_rows(model, x, _ce(y))
    F.cross_entropy(model(x), y).backward()
    for name in ("0", "2"):
        bias_grad = dict(model.named_modules())[name].bias.grad
        assert dense.rel_err(mean_gradient(rows[name]), bias_grad) <= 1e-12


def test_mean_gradient_vanishes_under_sampled_labels():
    """Output layer, categorical: g_n = p_n - e_{y_n}. With y_n ~ p_n, E[g] = 0 and
    E||mean_n g_n||^2 = s^2 = sum_k sum_n p_nk (1 - p_nk) / N^2; with labels fixed to class 0
    (empirical Fisher of a model that does not fit them) E[g] is far from 0."""
    model = _mlp(5)
    N = 4000
    x = torch.randn(N, 4, dtype=DT)
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    s = math.sqrt(float((p * (1 - p)).sum()) / N**2)
    gen = torch.Generator().manual_seed(0)
    sampled = diagnose(model, x, sampled_nll("categorical", generator=gen), layers=["2"])
    assert sampled["2"]["mean_grad_norm"] <= 4 * s
    empirical = diagnose(model, x, _ce(torch.zeros(N, dtype=torch.long)), layers=["2"])
    assert empirical["2"]["mean_grad_norm"] >= 10 * s


def test_inplace_activation_and_grads_untouched():
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    plain, inplace = _mlp(6), _mlp(6, inplace=True)
    r1, r2 = record_rows(plain, x, _ce(y)), record_rows(inplace, x, _ce(y))
    for name in r1:
        assert torch.equal(r1[name].a, r2[name].a) and torch.equal(r1[name].g, r2[name].g)
    assert all(p.grad is None for p in inplace.parameters())  # autograd.grad, not backward


def test_diagnose_dict_and_scalars():
    model = _mlp(7)
    x, y = torch.randn(10, 4, dtype=DT), torch.randint(0, 3, (10,))
    out = diagnose(model, x, _ce(y))
    keys = {
        "kronecker_error",
        "kronecker_error_std",
        "probes",
        "mean_grad_norm",
        "mean_grad_ratio",
        "num_examples",
        "rows",
        "kronecker_error_population",
    }
    assert set(out) == {"0", "2"} and all(set(v) == keys for v in out.values())
    assert all(0.0 <= v["mean_grad_ratio"] <= 1.0 for v in out.values())
    flat = to_scalars(out)
    assert flat["kfac_diag/2/kronecker_error"] == out["2"]["kronecker_error"]
    assert len(flat) == 2 * len(keys)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"method": "exact"}, "method"),
        ({"num_probes": 0}, "num_probes"),
        ({"num_examples": 3}, "num_examples"),
    ],
)
def test_bad_arguments_name_the_option(kwargs, name):
    with pytest.raises(ValueError, match=rf"Invalid {name}="):
        kronecker_error(torch.randn(8, 3, dtype=DT), torch.randn(8, 2, dtype=DT), **kwargs)


def test_bad_diagnose_arguments():
    model = _mlp()
    x, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    with pytest.raises(ValueError, match="Invalid loss_reduction="):
        diagnose(model, x, _ce(y), loss_reduction="avg")
    with pytest.raises(ValueError, match="Invalid layers="):
        diagnose(model, x, _ce(y), layers=["1"])  # a ReLU
    with pytest.raises(ValueError, match="Invalid likelihood="):
        sampled_nll("poisson")


def test_rows_match_engine_factors():
    """The rows' A = sum a a^T / B and G = sum g g^T / R equal the engine's first factors."""
    from lightning_kfac import KFACPreconditioner

    cases = ((_mlp(8), torch.randn(6, 4, dtype=DT)), (_cnn(8), torch.randn(3, 2, 4, 4, dtype=DT)))
    for model, x in cases:
        y = torch.randint(0, 3, (x.shape[0],))
        rows = record_rows(model, x, _ce(y))
        pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        factors = pre.factors()
        pre.remove()
        assert set(factors) == set(rows)
        for name, r in rows.items():
            A, G = factors[name]
            assert dense.rel_err(r.a.T @ r.a / r.num_examples, A) <= 1e-12
            assert dense.rel_err(r.g.T @ r.g / r.a.shape[0], G) <= 1e-12


def test_diagnose_pauses_an_attached_preconditioner():
    """A capturing preconditioner would add the diagnostic pass to its accumulators; passing it
    as ``preconditioner=`` pauses capture (and restores it)."""
    from lightning_kfac import KFACPreconditioner

    model = _mlp(9)
    x, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 3, (5,))
    pre = KFACPreconditioner(model, factor_update_steps=1)
    assert all(b.capturing for b in pre.layers.values())
    diagnose(model, x, _ce(y), preconditioner=pre, layers=list(pre.layers))
    assert not any(b.has_estimates() for b in pre.layers.values())
    assert all(b.capturing for b in pre.layers.values())
    diagnose(model, x, _ce(y))  # not paused: the hazard this option exists for
    assert all(b.has_estimates() for b in pre.layers.values())
    pre.remove()


def test_population_terms_equal_explicit_u_statistics():
    """The inclusion-exclusion sums equal explicit sums over distinct index tuples."""
    torch.manual_seed(10)
    B = 6
    a, g = torch.randn(B, 3, dtype=DT), torch.randn(B, 2, dtype=DT)
    P, Q = (a @ a.T) ** 2, (g @ g.T) ** 2
    m2 = sum(P[n, m] * Q[n, m] for n, m in itertools.permutations(range(B), 2)) / (B * (B - 1))
    cross = sum(P[n, m] * Q[n, k] for n, m, k in itertools.permutations(range(B), 3)) / (
        B * (B - 1) * (B - 2)
    )
    k2 = sum(P[n, m] * Q[k, j] for n, m, k, j in itertools.permutations(range(B), 4)) / (
        B * (B - 1) * (B - 2) * (B - 3)
    )
    e2_got, m2_got = population_terms(a, g)
    assert e2_got == pytest.approx(float(m2 - 2 * cross + k2), rel=1e-12, abs=1e-12)
    assert m2_got == pytest.approx(float(m2), rel=1e-12)


def test_population_estimate_is_unbiased_and_plug_in_is_not():
    """Batches of 16 drawn with replacement from a fixed population of 300 (a, g) rows whose
    Kronecker error is known exactly (plug-in on the whole population, dense). Over 400 batches
    the mean U-statistic estimates of ||M - K||^2 and ||M||^2 lie within 4 standard errors of
    the truth; the batch plug-in ||M - K||^2 overshoots by more than 4 standard errors (the
    small-batch bias the population estimate removes)."""
    torch.manual_seed(11)
    N = 300
    z = torch.randn(N, 3, dtype=DT)
    a = torch.cat([torch.tanh(z), torch.ones(N, 1, dtype=DT)], 1)
    g = torch.stack([z[:, 0] * z[:, 1], z[:, 2] ** 2 - 1], 1) + 0.3 * torch.randn(N, 2, dtype=DT)
    truth = kronecker_error(a, g, method="dense")
    e2_true, m2_true = truth.error_norm**2, truth.block_norm**2
    assert truth.relative > 0.1
    gen = torch.Generator().manual_seed(1)
    e2s, m2s, plug = [], [], []
    for _ in range(400):
        idx = torch.randint(0, N, (16,), generator=gen)
        e2, m2 = population_terms(a[idx], g[idx])
        e2s.append(e2)
        m2s.append(m2)
        plug.append(kronecker_error(a[idx], g[idx], method="dense").error_norm ** 2)

    def mean_se(values):
        t = torch.tensor(values, dtype=DT)
        return float(t.mean()), float(t.std() / math.sqrt(len(values)))

    for values, true in ((e2s, e2_true), (m2s, m2_true)):
        mean, se = mean_se(values)
        assert abs(mean - true) <= 4 * se
    mean, se = mean_se(plug)
    assert mean - e2_true > 4 * se


def test_record_rows_scales_each_call_of_a_shared_module_like_the_engine():
    """A Linear called twice per forward: each call's rows are rescaled by that call's examples
    (mean loss over B), so g equals the per-example gradient d l_n / d s_n of every call."""
    from lightning_kfac.diagnostics import record_rows

    torch.manual_seed(0)
    shared = torch.nn.Linear(3, 2).double()

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(x) + self.shared(2 * x)

    model, x = Twice(), torch.randn(4, 3, dtype=torch.float64)
    rows = record_rows(model, x, lambda out: out.pow(2).sum(1).mean())["shared"]
    per_example = 2 * model(x).detach()  # d(sum_j out_nj^2)/d s_n for both calls' outputs
    assert rows.num_examples == 8
    assert torch.allclose(rows.g, torch.cat([per_example, per_example]), rtol=1e-12, atol=0)
