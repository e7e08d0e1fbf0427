"""Restoring engine state: checked, converted, recomputed where options changed, transactional.

Must hold: ``load_state_dict`` refuses an unknown ``version`` and any layer whose
factor or decomposition shape does not fit (a resized layer, a frozen bias), naming the layer and
changing nothing; it casts states to the run's dtype (float32 <-> float64 resumes); a state saved
under another ``compute_method``, ``damping`` or ``damping_mode`` gets decompositions equal to a
float64 brute-force decomposition of the restored factors under the new options; an interrupt
(KeyboardInterrupt) inside a decomposition leaves the engine as before the step, so retrying the
step equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac import KFACPreconditioner
from tests.reliability.common import LAYERS, batch, mlp
from tests.reliability.test_resume import mismatches

pytestmark = pytest.mark.reliability

CLOCKS = dict(factor_update_steps=1, inv_update_steps=2, damping=1e-2, kl_clip=1e-2)


def _train(model, pre, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        x, y = batch(t, dtype=next(model.parameters()).dtype)
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()


def _saved(dtype=torch.float32, steps: int = 3, **options):
    model = mlp(dtype=dtype)
    pre = KFACPreconditioner(model, **dict(CLOCKS, **options))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, pre, opt, 0, steps)
    pre.remove()
    return model, pre.state_dict()


def test_unknown_version_and_misfit_shapes_are_refused_by_layer(reliability_row) -> None:
    _model, state = _saved()
    refused = 0
    target = KFACPreconditioner(mlp(), **CLOCKS)
    with pytest.raises(ValueError, match="version 99"):
        target.load_state_dict(dict(state, version=99))
    refused += 1
    frozen = mlp()
    frozen.fc1.bias.requires_grad_(False)  # W~ = [W b] loses its bias column
    target = KFACPreconditioner(frozen, **CLOCKS)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*shape \(9, 9\).*\(8, 8\)"):
        target.load_state_dict(state)
    assert target.steps == 0 and target.factors() == {}  # nothing changed
    refused += 1
    wider = KFACPreconditioner(mlp(hidden=12), **CLOCKS)
    with pytest.raises(ValueError, match="layer 'fc0'"):
        wider.load_state_dict(state)
    refused += 1
    reliability_row(
        "state checks",
        3,
        refused,
        "version, frozen bias, resized layer refused at load, naming the layer",
    )


@pytest.mark.parametrize(
    "saved,resumed", [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_state_is_cast_to_the_run_dtype(saved, resumed, reliability_row) -> None:
    """A state saved in one dtype resumes in the other: every tensor in the run's dtype, and the
    next steps equal a run whose state was cast by hand."""
    model, state = _saved(dtype=saved)
    target_model = copy.deepcopy(model).to(resumed)
    pre = KFACPreconditioner(target_model, **CLOCKS)
    pre.load_state_dict(state)
    dtypes = {t.dtype for b in pre.layers.values() for t in [b.A, b.G, *b.decomposition.values()]}
    opt = torch.optim.SGD(target_model.parameters(), lr=0.05)
    _train(target_model, pre, opt, 3, 6)
    finite = all(torch.isfinite(p).all() for p in target_model.parameters())
    reliability_row(
        "state checks",
        1,
        int(dtypes == {resumed} and finite),
        f"{str(saved)[6:]} -> {str(resumed)[6:]} resume",
    )
    assert dtypes == {resumed}
    assert finite and pre.steps == 6


def _inverse_reference(A, G, damping):
    """Factored Tikhonov damping (M&G 2015, sec. 6.3), float64 brute force."""
    A, G = A.double(), G.double()
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    root = math.sqrt(damping)
    return (
        torch.linalg.inv(A + pi * root * torch.eye(A.shape[0], dtype=A.dtype)),
        torch.linalg.inv(G + root / pi * torch.eye(G.shape[0], dtype=G.dtype)),
    )


@pytest.mark.parametrize(
    "before,after,option",
    [
        (dict(), dict(compute_method="inverse"), "compute_method"),
        (dict(), dict(compute_method="ekfac"), "compute_method"),
        (dict(compute_method="inverse"), dict(compute_method="inverse", damping=100.0), "damping"),
        (
            dict(compute_method="inverse"),
            dict(compute_method="inverse", damping_mode="relative"),
            "damping_mode",
        ),
    ],
)
def test_changed_options_recompute_the_decompositions(
    before, after, option, reliability_row
) -> None:
    """Resume at step 3 (a step that reuses the step-2 decomposition) under other options: the
    decompositions in use are those of the restored factors under the new options."""
    model, state = _saved(dtype=torch.float64, **before)
    pre = KFACPreconditioner(copy.deepcopy(model), **dict(CLOCKS, **after))
    with pytest.warns(UserWarning, match=option):
        pre.load_state_dict(state)
    worst = 0.0
    for name in LAYERS:
        block, saved = pre.layers[name], state["layers"][name]
        A, G = saved["A"], saved["G"]
        torch.testing.assert_close(block.A, A, rtol=0, atol=0)
        dec = block.decomposition
        if pre.config.compute_method == "inverse":
            damping = pre.config.damping
            if after.get("damping_mode") == "relative":
                damping *= float(A.trace() / A.shape[0] * G.trace() / G.shape[0])
            A_inv, G_inv = _inverse_reference(A, G, damping)
            worst = max(
                worst,
                float((dec["A_inv"] - A_inv).abs().max() / A_inv.abs().max()),
                float((dec["G_inv"] - G_inv).abs().max() / G_inv.abs().max()),
            )
        else:  # ekfac: the eigenbasis of the restored factors, scaling e_G e_A^T
            basis = torch.kron(dec["QA"], dec["QG"])  # column-stacking vec: A (x) G
            dense = basis @ torch.diag(dec["scale"].T.reshape(-1)) @ basis.T
            fisher = torch.kron(A, G)
            worst = max(worst, float((dense - fisher).abs().max() / fisher.abs().max()))
    opt = torch.optim.SGD(pre.model.parameters(), lr=0.05)
    _train(pre.model, pre, opt, 3, 5)  # and it trains on (no KeyError)
    reliability_row(
        "option change on resume",
        1,
        int(worst < 1e-10),
        f"{option}: decomposition vs float64 reference, rel. error {worst:.1e}",
    )
    assert worst < 1e-10, worst


def test_interrupt_inside_a_decomposition_leaves_the_state(monkeypatch, reliability_row) -> None:
    """Ctrl+C (KeyboardInterrupt) inside step 4's eigendecomposition: the engine is as before
    the step (factors, counters, clock); retrying the step ends bit-identical to a run that was
    never interrupted."""

    def run(interrupt_at):
        torch.manual_seed(0)
        model = mlp(dtype=torch.float64)
        pre = KFACPreconditioner(model, **CLOCKS)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        eigh = torch.linalg.eigh
        for t in range(8):
            opt.zero_grad()
            x, y = batch(t, dtype=torch.float64)
            F.cross_entropy(model(x), y).backward()
            if t == interrupt_at:
                before = pre.state_dict()
                calls = {"n": 0}

                def interrupting(matrix, *args, calls=calls, **kwargs):
                    calls["n"] += 1
                    if calls["n"] == 3:  # the second layer's first factor: mid-step
                        raise KeyboardInterrupt
                    return eigh(matrix, *args, **kwargs)

                monkeypatch.setattr(torch.linalg, "eigh", interrupting)
                with pytest.raises(KeyboardInterrupt):
                    pre.step(opt)
                monkeypatch.setattr(torch.linalg, "eigh", eigh)
                assert not mismatches(pre.state_dict(), before)
            pre.step(opt)
            opt.step()
        return {"model": model.state_dict(), "kfac": pre.state_dict()}

    bad = mismatches(run(interrupt_at=4), run(interrupt_at=None))
    reliability_row(
        "interrupted step",
        1,
        int(not bad),
        f"Ctrl+C inside a decomposition: mismatched tensors after retry {len(bad)}",
    )
    assert not bad, bad


class _FailsOnce(torch.optim.SGD):
    """SGD whose ``step`` raises once, at its ``fail_at``-th call (before changing anything)."""

    def __init__(self, params, fail_at: int, **kw):
        super().__init__(params, **kw)
        self.calls, self.fail_at = 0, fail_at

    def step(self, closure=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("optimizer failed")
        return super().step(closure)


def test_wrapped_optimizer_failure_undoes_the_kfac_step(reliability_row) -> None:
    """``pre.wrap(opt).step()`` where the inner ``step`` raises at step 3 (a factor-only step):
    the K-FAC step is undone, so running that batch again ends bit-identical to a run where the
    optimizer never failed."""

    def run(fail_at):
        model = mlp(dtype=torch.float64)
        pre = KFACPreconditioner(model, **CLOCKS)
        opt = pre.wrap(_FailsOnce(model.parameters(), fail_at, lr=0.05, momentum=0.9))
        t = 0
        while t < 8:
            opt.zero_grad()
            x, y = batch(t, dtype=torch.float64)
            F.cross_entropy(model(x), y).backward()
            try:
                opt.step()
            except RuntimeError:
                continue  # the same batch again
            t += 1
        return {"model": model.state_dict(), "kfac": pre.state_dict()}

    bad = mismatches(run(fail_at=4), run(fail_at=0))
    reliability_row(
        "interrupted step",
        1,
        int(not bad),
        f"wrapped optimizer raising at step 3: mismatched tensors after the retry {len(bad)}",
    )
    assert not bad, bad
