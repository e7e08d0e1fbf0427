"""Non-finite values: NaN/inf activations and gradients, and finite values whose K-FAC statistics
overflow float32.

What must hold (docs/reliability.md, "non-finite gradients"): no non-finite value reaches the
parameters or the running factors; the factor update of an affected layer is skipped (its
factors stay bit-identical) while healthy layers update by the running-average formula
``A <- decay A + (1 - decay) A^`` (Martens & Grosse 2015, sec. 5); one warning per layer; a
counter in ``pre.counters`` and in ``state_dict()``. Raw gradients that are themselves
non-finite are the loss scaler's job: the NaN/inf rows use ``torch.amp.GradScaler("cpu")``, which
skips such optimizer steps, exactly as under AMP.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac import KFACPreconditioner
from tests.reliability.common import LAYERS, all_finite, batch, factors_finite, mlp
from tests.support import dense as D

pytestmark = pytest.mark.reliability

DECAY = 0.9


def _expected_skips(model, store, scale: float) -> set[str]:
    """Layers whose brute-force batch estimate (docs/conventions.md definitions) is not finite."""
    brute = D.brute_factors(model, store)
    return {n for n, (a, g) in brute.items() if not all_finite([a, g / scale**2])}


def _check_update(pre, before, after, brute, skipped: set[str], scale: float) -> bool:
    """Skipped layers bit-identical; the others follow the running-average formula."""
    ok = True
    for name in LAYERS:
        if name in skipped:
            ok &= all(torch.equal(before[name][i], after[name][i]) for i in range(2))
            continue
        a_hat, g_hat = brute[name][0], brute[name][1] / scale**2
        for i, est in enumerate((a_hat, g_hat)):
            ref = DECAY * before[name][i] + (1 - DECAY) * est if name in before else est
            ok &= D.rel_err(after[name][i], ref) <= 1e-4
    return ok


def _warnings_per_layer(records, fragment: str) -> dict[str, int]:
    return {
        n: sum(fragment in str(w.message) and f"layer {n!r}" in str(w.message) for w in records)
        for n in LAYERS
    }


def test_random_nan_inf_faults_skip_updates_warn_once(reliability_row) -> None:
    """NaN/inf in activations or gradients at random steps (seed 7), under a GradScaler loop."""
    steps, n_faults = 40, 10
    gen = torch.Generator().manual_seed(7)
    fault_steps = sorted((1 + torch.randperm(steps - 1, generator=gen)[:n_faults]).tolist())
    kinds = ["act-nan", "act-inf", "grad-nan", "grad-inf"]
    plan = {
        t: (
            kinds[int(torch.randint(4, (1,), generator=gen))],
            int(torch.randint(2, (1,), generator=gen)),
        )
        for t in fault_steps
    }
    model = mlp()
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=2,
        damping=1e-2,
        kl_clip=1e-2,
        factor_decay=DECAY,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    survived, skipped_updates = 0, 0
    faulty_layers: set[str] = set()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for t in range(steps):
            kind, where = plan.get(t, (None, 0))
            inj = model.inj0 if where == 0 else model.inj1
            if kind:
                setattr(inj, kind.split("-")[0], kind.split("-")[1])
            before = pre.factors()
            opt.zero_grad()
            scale = scaler.get_scale()
            pre.grad_scale = scale
            with D.record(model, LAYERS) as store:
                x, y = batch(t)
                scaler.scale(F.cross_entropy(model(x), y)).backward()
            inj.clear()
            expected = _expected_skips(model, store, scale)
            scaler.unscale_(opt)
            pre.step(opt)
            scaler.step(opt)
            scaler.update()
            after = pre.factors()
            healthy = (
                all_finite(model.parameters())
                and factors_finite(pre)
                and _check_update(
                    pre, before, after, D.brute_factors(model, store), expected, scale
                )
            )
            assert healthy, f"step {t} ({kind} at inj{where}): expected skips {sorted(expected)}"
            if kind:
                assert expected, f"fault {kind} at step {t} did not reach any layer's statistics"
                survived += 1
                skipped_updates += len(expected)
                faulty_layers |= expected
    per_layer = _warnings_per_layer(records, "non-finite factor estimate")
    assert per_layer == {n: int(n in faulty_layers) for n in LAYERS}
    assert pre.counters["nonfinite_estimates"] == skipped_updates
    assert pre.counters["factor_updates"] == steps * len(LAYERS) - skipped_updates
    # the counter travels with the state (weights_only loading) into a fresh engine
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    fresh = KFACPreconditioner(mlp(), factor_update_steps=1, inv_update_steps=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.counters["nonfinite_estimates"] == skipped_updates
    reliability_row(
        "non-finite gradients",
        n_faults,
        survived,
        f"{skipped_updates} layer updates skipped, "
        f"{sum(per_layer.values())} warnings for {len(faulty_layers)} layers",
    )


def test_overflowing_statistics_with_finite_gradients(reliability_row) -> None:
    """Finite inputs/gradients whose ``a a^T`` / ``g g^T`` overflow float32; no loop guard.

    The engine alone must keep parameters finite: the estimate is discarded, the old
    decomposition preconditions the huge gradient and the KL clip bounds the step
    (``nu^2 sum lr^2 P.grad <= kl_clip``).
    """
    faults = {3: "input x1e20", 6: "grad x1e25", 9: "grad x1e30"}
    model = mlp()
    kl_clip, lr = 1e-2, 0.1
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=2,
        damping=1e-2,
        kl_clip=kl_clip,
        factor_decay=DECAY,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    survived, largest = 0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(12):
            x, y = batch(t)
            fault = faults.get(t, "")
            if fault.startswith("input"):
                x[0] *= 1e20
            elif fault:
                model.inj1.grad = float(fault.split("x")[1])
            before = pre.factors()
            params = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            with D.record(model, LAYERS) as store:
                F.cross_entropy(model(x), y).backward()
            model.inj1.clear()
            raw = [p.grad.detach().double().clone() for p in model.parameters()]
            assert all_finite(raw), "the injected fault must leave raw gradients finite"
            expected = _expected_skips(model, store, 1.0)
            pre.step(opt)
            nu = pre.last_stats["kl_clip_factor"]
            quad = (
                nu
                * lr**2
                * sum(float((p.grad.double() * r).sum()) for p, r in zip(model.parameters(), raw))
            )
            opt.step()
            moved = max(
                float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), params)
            )
            ok = (
                all_finite(model.parameters())
                and factors_finite(pre)
                and _check_update(
                    pre, before, pre.factors(), D.brute_factors(model, store), expected, 1.0
                )
                and quad <= kl_clip * (1 + 1e-3)
                and moved < 1.0
            )
            assert ok, f"step {t} ({fault}): KL quad {quad:.3g}, max |dtheta| {moved:.3g}"
            if fault:
                assert expected, f"{fault} did not overflow any statistic"
                survived += 1
                largest = max(largest, moved)
    reliability_row(
        "non-finite statistics, finite gradients",
        len(faults),
        survived,
        f"largest parameter change at a fault step {largest:.2f}",
    )


def test_nonfinite_raise_policy_names_layer(reliability_row) -> None:
    """``nonfinite="raise"``: FloatingPointError naming the layer; no factor touched."""
    model = mlp()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, nonfinite="raise")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(3):
        opt.zero_grad()
        x, y = batch(t)
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()
    before = pre.factors()
    model.inj1.grad = "nan"
    opt.zero_grad()
    x, y = batch(3)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(FloatingPointError, match=r"non-finite .* layer 'fc0'"):
        pre.step(opt)
    after = pre.factors()
    unchanged = all(torch.equal(before[n][i], after[n][i]) for n in LAYERS for i in range(2))
    assert unchanged
    reliability_row("non-finite gradients", 1, int(unchanged), "raise policy names the layer")


def test_nonfinite_preconditioned_gradient_keeps_raw(reliability_row) -> None:
    """damping=1e-46 is valid (> 0) but is 0 in float32: zero features of fc0 give 0/0 in
    ``(Q_G^T grad Q_A) / (e_G e_A^T + damping)``; fc0 keeps its raw gradient, counted, warned once.
    """
    model = mlp()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, damping=1e-46)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps, kept = 4, 0
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        for t in range(steps):
            x, y = batch(t)
            x[:, 3:] = 0.0  # A of fc0 is singular
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            raw = D.grad_matrix(model.fc0)
            pre.step(opt)
            kept += int(torch.equal(D.grad_matrix(model.fc0), raw))
            opt.step()
            assert all_finite(model.parameters())
    per_layer = _warnings_per_layer(records, "non-finite preconditioned gradient")
    assert kept == steps and per_layer["fc0"] == 1
    assert pre.counters["nonfinite_gradients"] >= steps
    reliability_row("non-finite gradients", steps, kept, "non-finite P: raw gradient kept")
