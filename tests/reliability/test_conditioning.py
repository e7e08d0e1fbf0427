"""Ill-conditioned and degenerate factors, and the damping sweep.

Ill-conditioning (docs/reliability.md): batch size 1 (rank-1 factors), dead ReLU units (zero rows of
G and of the next layer's A), duplicated and all-zero input features (singular A) and inputs whose
covariance has condition number 1e4 ... 1e16. Must hold: finite factors, decompositions and
parameters, eigenvalues clamped >= 0, no decomposition failure; in float64 the preconditioned
gradient equals the dense solve ``(A (x) G + damping I)^-1 vec(grad)`` (eigen) or the factored
Tikhonov formula (inverse, Martens & Grosse 2015, sec. 6.3).

Damping sweep: damping 1e-12 ... 1e2 on a ReLU net with dead units; every step finite with the
default KL clip; invalid dampings rejected by KFACConfig with a ValueError naming the option.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from tests.reliability.common import all_finite, batch, factors_finite
from tests.support import dense as D

pytestmark = pytest.mark.reliability

CONDITIONS = [1e4, 1e8, 1e12, 1e16]
CASES = ["batch size 1", "dead units", "duplicated features", "zero features"] + [
    f"condition {c:.0e}" for c in CONDITIONS
]


def relu_mlp(dtype=torch.float32, dead: int = 3) -> nn.Sequential:
    """6 -> 8 -> 8 -> 3 with ReLU; the first ``dead`` units of layer 0 never fire (bias -10)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).to(dtype)
    with torch.no_grad():
        model[0].bias[:dead] = -10.0
    return model


def case_batch(case: str, t: int, dtype) -> tuple:
    n = 1 if case == "batch size 1" else 16
    x, y = batch(t, n=n, dtype=dtype)
    if case == "duplicated features":
        x[:, 3:] = x[:, :3]
    elif case == "zero features":
        x[:, 2:] = 0.0
    elif case.startswith("condition"):
        cond = float(case.split()[1])
        gen = torch.Generator().manual_seed(5)
        q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
        scales = torch.logspace(0, -math.log10(cond) / 2, 6, dtype=torch.float64)
        x = ((x.double() * scales) @ q.T).to(dtype)  # covariance eigenvalues 1 ... 1/cond
    return x, y


def _reference(model, pre, raw: dict, method: str, damping: float) -> float:
    """Max relative error of the engine's P against the dense formulas, over layers."""
    errs = []
    for name, (A, G) in pre.factors().items():
        module = dict(model.named_modules())[name]
        ref = (
            D.eigen_precondition(A, G, raw[name], damping)
            if method == "eigen"
            else D.inverse_precondition(A, G, raw[name], damping)
        )
        errs.append(D.rel_err(D.grad_matrix(module), ref))
    return max(errs)


def _run_case(case: str, method: str, dtype, steps: int = 5, damping: float = 1e-3):
    model = relu_mlp(dtype, dead=3 if case == "dead units" else 0)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=1,
        damping=damping,
        compute_method=method,
        kl_clip=None if dtype == torch.float64 else 1e-3,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    worst = 0.0
    for t in range(steps):
        opt.zero_grad()
        x, y = case_batch(case, t, dtype)
        F.cross_entropy(model(x), y).backward()
        raw = {n: D.grad_matrix(m) for n, m in model.named_modules() if n in pre.layers}
        pre.step(opt)
        if dtype == torch.float64:
            worst = max(worst, _reference(model, pre, raw, method, damping))
        opt.step()
    eig_ok = all(
        bool((v >= 0).all())
        for b in pre.layers.values()
        for k, v in b.decomposition.items()
        if k in ("eA", "eG")
    )
    finite = (
        all_finite(model.parameters())
        and factors_finite(pre)
        and all(all_finite(b.decomposition.values()) for b in pre.layers.values())
        and pre.counters["nonfinite_gradients"] == 0
        and pre.counters["decomposition_failures"] == 0
    )
    return finite and eig_ok, worst


def test_ill_conditioned_factors(reliability_row) -> None:
    """Every degenerate case, both methods: finite, eigenvalues >= 0, float64 equals dense."""
    injected, survived, largest, failures = 0, 0, 0.0, []
    for case in CASES:
        for method in ("eigen", "inverse"):
            injected += 1
            ok32, _ = _run_case(case, method, torch.float32)
            ok64, err = _run_case(case, method, torch.float64)
            if ok32 and ok64 and err <= 1e-6:
                survived += 1
                if case.startswith("condition"):
                    largest = max(largest, float(case.split()[1]))
            else:
                failures.append(
                    f"{case}/{method}: float32 ok={ok32}, float64 ok={ok64} err={err:.1e}"
                )
    assert not failures, failures
    assert largest >= 1e12
    reliability_row(
        "ill-conditioning",
        injected,
        survived,
        f"largest condition survived {largest:.0e} (float32 and float64)",
    )


def test_damping_sweep(reliability_row) -> None:
    """Damping 1e-12 ... 1e2 (15 values) x {eigen, inverse} x {kl_clip 1e-3, none}, 20 steps."""
    dampings = [10.0**k for k in range(-12, 3)]
    finite = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for method in ("eigen", "inverse"):
            for kl_clip in (1e-3, None):
                for damping in dampings:
                    model = relu_mlp()
                    pre = KFACPreconditioner(
                        model,
                        factor_update_steps=1,
                        inv_update_steps=1,
                        damping=damping,
                        compute_method=method,
                        kl_clip=kl_clip,
                    )
                    opt = torch.optim.SGD(model.parameters(), lr=0.1)
                    ok = True
                    for t in range(20):
                        opt.zero_grad()
                        x, y = batch(t)
                        F.cross_entropy(model(x), y).backward()
                        pre.step(opt)
                        opt.step()
                        ok &= all_finite(model.parameters()) and factors_finite(pre)
                    finite[(method, kl_clip, damping)] = ok
    clipped = [finite[(m, 1e-3, d)] for m in ("eigen", "inverse") for d in dampings]
    assert all(clipped), {k: v for k, v in finite.items() if k[1] == 1e-3 and not v}

    def smallest_safe(method) -> float:  # smallest damping with every larger one finite too
        safe = dampings[-1]
        for d in reversed(dampings):
            if not finite[(method, None, d)]:
                break
            safe = d
        return safe

    unclipped = max(smallest_safe("eigen"), smallest_safe("inverse"))
    assert unclipped <= 1e-2
    reliability_row(
        "damping sweep",
        len(clipped),
        sum(clipped),
        f"smallest safe damping 1e-12 with kl_clip=1e-3 (every step finite); "
        f"without KL clip {unclipped:.0e}",
    )


@pytest.mark.parametrize(
    "value", [0.0, -1e-3, float("nan"), float("inf"), -float("inf"), "1e-3", True, None, [1e-3]]
)
def test_invalid_damping_rejected(value, reliability_row) -> None:
    with pytest.raises(ValueError, match=r"damping=") as err:
        KFACConfig(damping=value)
    assert "must be" in str(err.value)
    with pytest.raises(ValueError, match=r"layer_overrides\[0\]\.damping="):
        KFACConfig(layer_overrides=[{"regex": "fc", "damping": value}])
    reliability_row("damping sweep", 1, 1, "")
