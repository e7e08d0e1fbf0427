"""Decomposition failures injected into the real engine by patching ``torch.linalg``.

What must hold (docs/reliability.md, "decomposition failure"): a float32 eigh/inverse that raises or
returns NaN is retried in float64 (with a tiny jitter) and succeeds; when the retry fails too,
the previous decomposition stays in use (bit-identical) and the step is preconditioned with it
(dense reference: ``(A_old (x) G_old + damping I)^-1 vec(grad)``); the next healthy
decomposition recovers; ``max_decomposition_failures`` consecutive failures raise an error that
names the layer and suggests a damping.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac import KFACPreconditioner
from tests.reliability.common import all_finite, batch, mlp
from tests.support import dense as D

pytestmark = pytest.mark.reliability

TARGET_DIM = 7  # fc0's A factor (6 inputs + bias) is the only 7 x 7 matrix of the model
DAMPING = 1e-2


def _faulty(real: Callable, mode: str, when: Callable[[torch.Tensor], bool], log: list):
    """Wrap ``real`` so that it raises or returns NaN for matrices where ``when(m)`` holds."""

    def fake(m, *args, **kwargs):
        log.append((m.shape[0], m.dtype))
        if m.shape[0] == TARGET_DIM and when(m):
            if mode == "raise":
                raise torch.linalg.LinAlgError("injected failure")
            out = real(m, *args, **kwargs)
            return type(out)(torch.full_like(t, float("nan")) for t in out)
        return real(m, *args, **kwargs)

    return fake


def _step(model, pre, opt, t):
    opt.zero_grad()
    x, y = batch(t, dtype=torch.float64)
    F.cross_entropy(model(x), y).backward()
    raw = D.grad_matrix(model.fc0)
    pre.step(opt)
    return raw


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_float32_failure_rescued_by_float64_retry(mode, monkeypatch, reliability_row) -> None:
    """eigh fails for every float32 call on fc0's A; the float64 retry gives the true result."""
    model = mlp()  # float32 model: factors are float32, so the retry is a real dtype change
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=DAMPING)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    log: list = []
    real = torch.linalg.eigh
    monkeypatch.setattr(
        torch.linalg, "eigh", _faulty(real, mode, lambda m: m.dtype == torch.float32, log)
    )
    steps = 5
    for t in range(steps):
        opt.zero_grad()
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()
    monkeypatch.undo()
    dec, A = pre.layers["fc0"].decomposition, pre.layers["fc0"].A
    rebuilt = dec["QA"] @ torch.diag(dec["eA"]) @ dec["QA"].T
    retries = sum(1 for d, dt in log if d == TARGET_DIM and dt == torch.float64)
    assert retries == steps
    assert pre.counters["decomposition_failures"] == 0
    assert pre.counters["decompositions"] == steps * 3
    assert dec["QA"].dtype == torch.float32 and bool((dec["eA"] >= 0).all())
    assert D.rel_err(rebuilt, A) <= 1e-5
    reliability_row(
        "decomposition failure", steps, retries, "float64 retry rescued every float32 failure"
    )


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_failures_keep_previous_decomposition_then_recover(
    method, mode, monkeypatch, reliability_row
) -> None:
    """Both attempts fail at steps 4 and 5 (n=2 < 3): old decomposition used, step 6 recovers."""
    fail_steps = {4, 5}
    model = mlp(dtype=torch.float64)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        damping=DAMPING,
        compute_method=method,
        kl_clip=None,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    name = "eigh" if method == "eigen" else "cholesky_ex"
    real = getattr(torch.linalg, name)
    clock = {"t": 0}
    log: list = []
    monkeypatch.setattr(
        torch.linalg, name, _faulty(real, mode, lambda m: clock["t"] in fail_steps, log)
    )
    if method == "inverse":  # the LU fallback of a failed Cholesky must fail as well
        monkeypatch.setattr(
            torch.linalg,
            "inv",
            _faulty(torch.linalg.inv, mode, lambda m: clock["t"] in fail_steps, log),
        )
    kept, recovered_at, used_old = 0, None, 0
    snapshot, factors_at_snapshot = None, None
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for t in range(8):
            clock["t"] = t
            raw = _step(model, pre, opt, t)
            block = pre.layers["fc0"]
            dec = {k: v.clone() for k, v in block.decomposition.items()}
            if t in fail_steps:
                same = all(torch.equal(dec[k], snapshot[k]) for k in snapshot)
                kept += int(same)
                # the gradient was preconditioned with the decomposition of the older factors
                A_old, G_old = factors_at_snapshot
                ref = (
                    D.eigen_precondition(A_old, G_old, raw, DAMPING)
                    if method == "eigen"
                    else D.inverse_precondition(A_old, G_old, raw, DAMPING)
                )
                err = D.rel_err(D.grad_matrix(model.fc0), ref)
                used_old += int(err <= 1e-8)
            else:
                if t - 1 in fail_steps and recovered_at is None:
                    changed = any(not torch.equal(dec[k], snapshot[k]) for k in snapshot)
                    recovered_at = t if changed else None
                snapshot, factors_at_snapshot = dec, (block.A.clone(), block.G.clone())
            opt.step()
            assert all_finite(model.parameters())
    fails = [w for w in records if "decomposition of layer 'fc0' failed" in str(w.message)]
    assert kept == len(fail_steps) and used_old == len(fail_steps)
    assert recovered_at == max(fail_steps) + 1
    assert pre.counters["decomposition_failures"] == len(fail_steps)
    assert len(fails) == 1  # warned once for the layer
    assert any(dt == torch.float64 for d, dt in log if d == TARGET_DIM)  # the retry was tried
    reliability_row(
        "decomposition failure",
        len(fail_steps),
        kept,
        f"previous kept, recovery step {recovered_at} (eigen/inverse x raise/NaN)",
    )


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_repeated_failures_raise_naming_the_layer(method, monkeypatch, reliability_row) -> None:
    """``max_decomposition_failures=3`` consecutive failures: RuntimeError naming 'fc0'."""
    model = mlp(dtype=torch.float64)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        damping=DAMPING,
        compute_method=method,
        max_decomposition_failures=3,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _step(model, pre, opt, 0)
    log: list = []
    name = "eigh" if method == "eigen" else "cholesky_ex"
    monkeypatch.setattr(
        torch.linalg, name, _faulty(getattr(torch.linalg, name), "raise", lambda m: True, log)
    )
    if method == "inverse":
        monkeypatch.setattr(
            torch.linalg, "inv", _faulty(torch.linalg.inv, "raise", lambda m: True, log)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _step(model, pre, opt, 1)
        _step(model, pre, opt, 2)
        with pytest.raises(RuntimeError, match=r"layer 'fc0' failed 3 times .* damping"):
            _step(model, pre, opt, 3)
    assert pre.counters["decomposition_failures"] == 3
    reliability_row("decomposition failure", 1, 1, "3 failures in a row: error names the layer")
