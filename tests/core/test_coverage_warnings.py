"""Never silently off (core/coverage.py, core/parametrized.py).

- The plain engine warns once, grouped by reason, about skipped modules holding trainable
  parameters; under 50% coverage a second warning names the largest skipped modules and the fix.
  A fully covered model, or modules skipped on purpose (skip_layers), warn nothing.
- A registered layer that is never preconditioned warns with its real cause: functional use (the
  parent reads the weight), compiled with ``torch.compile`` before the hooks were attached, no
  output gradient (by the end of the first decomposition interval).
- Parametrized weights (parametrize: weight_norm, spectral_norm; legacy hook-based weight_norm)
  are skipped with the reason, and K-FAC never evaluates a parametrization: with spectral_norm
  the power iteration runs exactly once per training forward, as without K-FAC.
- ``torch.compile`` after the hooks are attached: factors equal the uncompiled run's; compiled
  and called before: the warning names torch.compile (plain loop and Lightning).
"""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from lightning_kfac import KFACCallback, KFACCoverageWarning, KFACPreconditioner
from tests.support.lightning import loader, make_dataset, make_trainer

EVERY = dict(factor_update_steps=1, inv_update_steps=1)


def _kfac_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, KFACCoverageWarning)]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.rnn = nn.GRU(8, 32, batch_first=True)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        out, _ = self.rnn(self.norm2(self.norm1(x)))
        return self.head(out[:, -1])


def test_engine_warns_once_about_skipped_modules_grouped_and_low_coverage():
    torch.manual_seed(0)
    model = Mixed()
    pre, messages = _kfac_warnings(lambda: KFACPreconditioner(model))
    assert len(messages) == 2
    skipped, low = messages
    gru = sum(p.numel() for p in model.rnn.parameters())
    assert "3 module(s)" in skipped and f"1 x GRU ({gru:,} params: 'rnn')" in skipped
    assert "2 x LayerNorm (32 params: 'norm1', 'norm2')" in skipped
    covered = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert f"only {100 * covered / total:.1f}%" in low and f"({covered:,} of {total:,})" in low
    largest = low.splitlines()[1]
    assert largest.startswith("  rnn (GRU") and "Fix:" in low
    pre.remove()


def test_no_warning_for_full_coverage_or_deliberate_skips():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    _, messages = _kfac_warnings(lambda: KFACPreconditioner(model).remove())
    assert messages == []
    _, messages = _kfac_warnings(lambda: KFACPreconditioner(model, skip_layers=["^2$"]).remove())
    assert messages == []


class TiedWithOwnBiases(nn.Module):
    """One weight held by two Linear modules with different biases: the weight is one block, each
    holder's bias keeps its raw gradient (core/sharing.py)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_skipped_count_leaves_out_the_preconditioned_shared_weight():
    """The warning counts what keeps its raw gradient (the biases), not the shared weight too."""
    model = TiedWithOwnBiases()
    pre, messages = _kfac_warnings(lambda: KFACPreconditioner(model))
    total = sum(p.numel() for p in model.parameters())
    raw = total - pre.coverage()["covered"]
    assert raw == 12  # the two biases
    assert len(messages) == 1 and f"holding {raw:,} trainable parameters" in messages[0]
    pre.remove()


class Functional(nn.Module):
    """``proj``'s weight is read by its parent, never called (as MHA does with out_proj)."""

    def __init__(self):
        super().__init__()
        self.inp, self.proj = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return F.linear(torch.tanh(self.inp(x)), self.proj.weight, self.proj.bias)


def test_functional_use_warns_with_its_cause():
    model = Functional()
    pre = KFACPreconditioner(model, **EVERY)
    model(torch.randn(8, 4)).square().mean().backward()
    _, messages = _kfac_warnings(pre.step)
    assert len(messages) == 1 and "'proj'" in messages[0]
    assert "functional use" in messages[0] and "Functional ('<root>')" in messages[0]
    assert set(pre.layers) == {"inp"}


def test_no_output_gradient_warns_at_the_end_of_the_first_interval():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=3)
    messages = []
    for _t in range(4):
        x = torch.randn(8, 4)
        hidden = model[0](x)
        loss = model[1](hidden.detach()).square().mean()
        loss.backward()
        _, caught = _kfac_warnings(pre.step)
        messages.append(caught)
    assert messages[:2] == [[], []] and messages[3] == []  # end of interval: step 2, once
    assert len(messages[2]) == 1 and "'0'" in messages[2][0]
    assert "no gradient of the loss reached its output" in messages[2][0]


# -- parametrizations ------------------------------------------------------------------------------
class Param(pl.LightningModule):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.inp = wrap(nn.Linear(6, 8)).double()
        self.out = nn.Linear(8, 3).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.out(torch.tanh(self.inp(x))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _legacy_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations.weight_norm
        return torch.nn.utils.weight_norm(module)


@pytest.mark.parametrize(
    "wrap, label",
    [
        (parametrizations.weight_norm, "_WeightNorm"),
        (parametrizations.spectral_norm, "_SpectralNorm"),
        (_legacy_weight_norm, "torch.nn.utils.weight_norm"),
    ],
)
def test_parametrized_weights_are_skipped_with_the_reason(wrap, label):
    model = Param(wrap)
    pre, messages = _kfac_warnings(lambda: KFACPreconditioner(model))
    assert set(pre.layers) == {"out"}
    reason = {s.name: s.reason for s in pre.skipped}["inp"]
    assert label in reason and "not the weight K-FAC's factors describe" in reason
    assert "'inp'" in messages[0]  # (and the low-coverage warning: 70% skipped)
    own = sum(p.numel() for p in model.inp.parameters())
    assert {s.name: s.num_params for s in pre.skipped}["inp"] == own
    assert not any("parametrizations" in s.name for s in pre.skipped)
    pre.remove()


def test_callback_never_evaluates_spectral_norm(tmp_path):
    """Each training forward evaluates the parametrization once; K-FAC adds no evaluation."""
    counts = []
    for callbacks in ([], [KFACCallback(**EVERY, diagnostics_every_n_steps=2)]):
        model = Param(parametrizations.spectral_norm)
        calls = []
        model.inp.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_trainer(tmp_path, max_steps=5, callbacks=callbacks).fit(
                model, loader(make_dataset(40), 8)
            )
        counts.append(len(calls))
    assert counts == [5, 5]


# -- torch.compile ---------------------------------------------------------------------------------
def _train(model, call, steps=3):
    pre = KFACPreconditioner(model, **EVERY)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(call(x), y).backward()
        pre.step(opt)
        opt.step()
    return pre


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)  # inductor: ~15 s here
def test_compiled_after_hooks_gets_the_uncompiled_factors(backend):
    torch._dynamo.reset()
    reference = _net()
    expected = _train(reference, reference).factors()
    model = _net()
    pre = KFACPreconditioner(model, **EVERY)  # hooks first ...
    pre.remove()
    compiled = torch.compile(model, backend=backend)  # ... then compile
    got = _train(model, compiled).factors()
    assert got.keys() == expected.keys() == {"0", "2"}
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compiled_and_called_before_the_hooks_warns_with_the_cause():
    torch._dynamo.reset()
    model = _net()
    call = torch.compile(model, backend="eager")
    call(torch.randn(16, 6))  # traced without K-FAC's hooks, for the batch shape used below
    pre, messages = _kfac_warnings(lambda: _train(model, call))
    assert pre.factors() == {}
    assert len(messages) == 1 and "compiled with torch.compile before K-FAC attached" in messages[0]
    assert "<root> (torch.compile(module))" in messages[0] and "docs/compile.md" in messages[0]
    torch._dynamo.reset()


def test_in_place_compile_called_before_the_hooks_still_gets_them():
    """``module.compile()`` (in place) is retraced when hooks are added: the factors are the
    uncompiled run's (measured on torch 2.13; ``torch.compile(module)`` is not retraced)."""
    torch._dynamo.reset()
    reference = _net()
    expected = _train(reference, reference).factors()
    model = _net()
    model.compile(backend="eager")
    model(torch.randn(16, 6))
    got = _train(model, model).factors()
    assert got.keys() == expected.keys() == {"0", "2"}
    for name in expected:
        for a, b in zip(got[name], expected[name]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


class CompiledNet(pl.LightningModule):
    """``compile_when``: "init" (compiled and called before fit), "on_fit_start" (the docs' way)."""

    def __init__(self, compile_when):
        super().__init__()
        self.net = _net().double()
        self.compile_when = compile_when
        if compile_when == "init":
            self.net = torch.compile(self.net, backend="aot_eager")
            self.net(torch.randn(8, 6, dtype=torch.float64))  # the training batch shape

    def on_fit_start(self):  # runs after the callbacks' on_fit_start: K-FAC's hooks are on
        if self.compile_when == "on_fit_start":
            self.net.compile(backend="aot_eager")

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_compile_in_on_fit_start_is_preconditioned_and_before_fit_warns(tmp_path):
    factors, messages = {}, {}
    for when in ("never", "on_fit_start", "init"):
        torch._dynamo.reset()
        kfac = KFACCallback(**EVERY)
        trainer = make_trainer(tmp_path, max_steps=3, callbacks=[kfac])
        _, messages[when] = _kfac_warnings(
            lambda: trainer.fit(CompiledNet(when), loader(make_dataset(24), 8))
        )
        factors[when] = kfac.factors()
    torch._dynamo.reset()
    assert set(factors["on_fit_start"]) == set(factors["never"]) == {"net.0", "net.2"}
    for name, (A, G) in factors["never"].items():
        torch.testing.assert_close(factors["on_fit_start"][name][0], A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(factors["on_fit_start"][name][1], G, rtol=1e-9, atol=1e-12)
    assert messages["never"] == messages["on_fit_start"] == []
    assert factors["init"] == {}
    assert len(messages["init"]) == 1
    assert "net (torch.compile(module) inside the model)" in messages["init"][0]
