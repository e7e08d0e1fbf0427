"""MC and empirical Fisher describe the same loss when it averages over C outputs.

Must hold (the scale convention in docs/engine.md): with labels drawn from the model,
the expected MC G equals the expected empirical G, so a loss averaged over C outputs
(``nn.BCEWithLogitsLoss()``, ``nn.MSELoss()`` with ``gaussian_variance=0.5``, for which
``-log p`` is the squared error) makes both 1/C^2 of the summed loss's. Here C = 5: both Fisher
types are estimated from K = 300 independent single-draw batches on a fixed model (no parameter
update, ``factor_decay=0``, so each step's G is that batch's estimate), and

- per layer, ``mean tr(G_mc) / mean tr(G_emp)`` must be 1 within 5 standard errors (delta method
  from the samples; the standard error is ~2% here, while the old scale was off by C^2 = 25);
- for the output layer, the known expectation: ``tr E[G] = sum_c p_c (1 - p_c) / C^2`` averaged over
  examples (bernoulli) and ``tr E[G] = C * 4 sigma^2 / C^2`` (gaussian), both Fisher types within
  5 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner

pytestmark = pytest.mark.reliability

C, N, K = 5, 16, 300
VAR = 0.5
DT = torch.float64


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C)).to(DT)


def _traces(likelihood: str, fisher: str) -> dict[str, Tensor]:
    model = _model()
    x = torch.randn(N, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    loss_fn = nn.BCEWithLogitsLoss() if likelihood == "bernoulli" else nn.MSELoss()
    torch.manual_seed(11)
    pre = KFACPreconditioner(
        model,
        fisher_type=fisher,
        likelihood=likelihood,
        gaussian_variance=VAR,
        factor_decay=0.0,
        factor_update_steps=1,
        inv_update_steps=10**6,
        kl_clip=None,
    )
    gen = torch.Generator().manual_seed(7)
    traces: dict[str, list[float]] = {}
    for _ in range(K):
        model.zero_grad()
        f = model(x)
        with torch.no_grad():  # labels from the model's own predictive distribution
            if likelihood == "bernoulli":
                y = torch.bernoulli(torch.sigmoid(f), generator=gen)
            else:
                y = f + math.sqrt(VAR) * torch.randn(f.shape, generator=gen, dtype=DT)
        if fisher == "mc":
            pre.mc_backward()
        loss_fn(f, y).backward()
        pre.step()
        for name, (_, G) in pre.factors().items():
            traces.setdefault(name, []).append(float(G.trace()))
    pre.remove()
    return {name: torch.tensor(v, dtype=DT) for name, v in traces.items()}, model, x


def _exact_last_layer_trace(likelihood: str, model: nn.Module, x: Tensor) -> float:
    if likelihood == "bernoulli":
        with torch.no_grad():
            p = torch.sigmoid(model(x))
        return float((p * (1 - p)).sum(1).mean()) / C**2
    return C * 4 * VAR / C**2


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_mc_and_empirical_G_agree_for_losses_averaged_over_outputs(
    likelihood, reliability_row
) -> None:
    mc, model, x = _traces(likelihood, "mc")
    emp, _, _ = _traces(likelihood, "empirical")
    ratios, worst = [], 0.0
    for name in mc:
        a, b = mc[name], emp[name]
        ratio = float(a.mean() / b.mean())
        rel_se = math.sqrt(
            float(a.var()) / (K * float(a.mean()) ** 2)
            + float(b.var()) / (K * float(b.mean()) ** 2)
        )
        assert rel_se < 0.05, (name, rel_se)  # the test can tell 1 from 1.25, let alone 25
        worst = max(worst, abs(ratio - 1) / rel_se)
        ratios.append(f"{name} {ratio:.3f}")
    exact = _exact_last_layer_trace(likelihood, model, x)
    z_exact = [
        abs(float(t["2"].mean()) - exact) / (float(t["2"].std()) / math.sqrt(K)) for t in (mc, emp)
    ]
    ok = worst < 5 and max(z_exact) < 5
    reliability_row(
        "MC/empirical scale",
        1,
        int(ok),
        f"{likelihood}, C={C}: tr G_mc / tr G_emp " + ", ".join(ratios),
    )
    assert worst < 5, ratios
    assert max(z_exact) < 5, (z_exact, exact)
