"""fisher_type="mc": G from labels sampled from the model's own predictive (core/mc.py).

References are brute force, independent of the engine: per-example Jacobians of ``log p(.|x_n)``
with respect to each layer's output (torch.func.jacrev on a hand-written functional copy of the
model), weighted by the model's own class probabilities, give the exact Fisher factor
``G = (1/N) sum_n E_{c~p(.|x_n)}[g_nc g_nc^T]`` with ``g_nc = -d log p(c|x_n)/ds_n``.

Statistical tests use a fixed seed and a tolerance of 5 standard errors *estimated from the
samples themselves* (per entry: std over K independent estimates / sqrt(K)); under the CLT a
false failure of one entry has probability ~6e-7, so < 1e-4 over every entry checked, and a
biased sampler (e.g. argmax labels, the empirical labels, a wrong variance) misses by far more.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev

from lightning_kfac import KFACPreconditioner

DT = torch.float64


def _mlp(out: int = 3, inplace: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.ReLU(inplace=inplace), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, out)
    ).to(DT)


def _tails(model: nn.Sequential) -> dict[str, object]:
    """Functional maps from each Linear's output to the model output (no in-place ops)."""
    l2, l4 = model[2], model[4]
    return {
        "0": lambda s: l4(torch.tanh(l2(torch.relu(s)))),
        "2": lambda s: l4(torch.tanh(s)),
        "4": lambda s: s,
    }


def _layer_outputs(model: nn.Sequential, x: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        s0 = model[0](x)
        s2 = model[2](torch.relu(s0))
        s4 = model[4](torch.tanh(s2))
    return {"0": s0, "2": s2, "4": s4}


def _exact_fisher_G(model: nn.Sequential, x: Tensor) -> dict[str, Tensor]:
    """``(1/N) sum_n sum_c p_nc J_n[c] J_n[c]^T``, J_n = d log softmax(tail(s_n)) / d s_n."""
    outs, tails = _layer_outputs(model, x), _tails(model)
    probs = torch.softmax(outs["4"], -1)
    result = {}
    for name, tail in tails.items():
        G = 0
        for n in range(x.shape[0]):
            J = jacrev(lambda s: torch.log_softmax(tail(s), -1))(outs[name][n])  # C x d
            G = G + (J.T * probs[n]) @ J
        result[name] = (G / x.shape[0]).detach()
    return result


def _factor_step(pre: KFACPreconditioner, model: nn.Module, x: Tensor, **kw) -> None:
    model(x)
    pre.mc.backward(**kw) if kw else pre.mc_backward()
    pre.step()


def test_enumerated_classes_give_the_exact_fisher_factors() -> None:
    model, x = _mlp(), torch.randn(7, 4, dtype=DT)
    pre = KFACPreconditioner(
        model, fisher_type="mc", factor_decay=0.0, factor_update_steps=1, inv_update_steps=1
    )
    _factor_step(pre, model, x, enumerate_classes=True)
    exact = _exact_fisher_G(model, x)
    a = torch.cat([x, torch.ones(7, 1, dtype=DT)], 1)
    for name, (_A, G) in pre.factors().items():
        assert torch.allclose(G, exact[name], rtol=1e-10, atol=1e-14), name
    assert torch.allclose(pre.factors()["0"][0], a.T @ a / 7, rtol=1e-12)
    # Last layer in closed form: g = p - e_c, so E_c[g g^T] = diag(p) - p p^T.
    p = torch.softmax(_layer_outputs(model, x)["4"], -1)
    closed = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    assert torch.allclose(pre.factors()["4"][1], closed, rtol=1e-10, atol=1e-14)


def test_micro_batches_merge_into_the_full_batch_estimate() -> None:
    model, x = _mlp(), torch.randn(8, 4, dtype=DT)
    full = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1)
    _factor_step(full, model, x, enumerate_classes=True)
    full.remove()
    split = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1)
    for part in x.chunk(2):
        model(part)
        split.mc.backward(enumerate_classes=True)
    split.step()
    for name, (A, G) in full.factors().items():
        A2, G2 = split.factors()[name]
        assert torch.allclose(A, A2, rtol=1e-12) and torch.allclose(G, G2, rtol=1e-12), name


def _sampled_estimates(model: nn.Module, x: Tensor, k: int, **options) -> dict[str, Tensor]:
    """K independent single-sample G estimates per layer (factor_decay=0: G = this step's G^)."""
    torch.manual_seed(1234)
    pre = KFACPreconditioner(
        model,
        fisher_type="mc",
        factor_decay=0.0,
        factor_update_steps=1,
        inv_update_steps=10**6,
        **options,
    )
    runs: dict[str, list[Tensor]] = {}
    for _ in range(k):
        _factor_step(pre, model, x)
        for name, (_, G) in pre.factors().items():
            runs.setdefault(name, []).append(G)
    pre.remove()
    return {name: torch.stack(gs) for name, gs in runs.items()}


def _within_5_se(samples: Tensor, expected: Tensor) -> float:
    """Largest |mean - expected| in units of the per-entry standard error (from the samples)."""
    mean = samples.mean(0)
    se = samples.std(0) / samples.shape[0] ** 0.5
    z = (mean - expected).abs() / (se + 1e-15)
    return float(z.max())


def test_sampled_categorical_G_converges_to_the_exact_fisher() -> None:
    model, x = _mlp(), torch.randn(6, 4, dtype=DT)
    exact = _exact_fisher_G(model, x)
    samples = _sampled_estimates(model, x, k=200)
    for name, gs in samples.items():
        assert _within_5_se(gs, exact[name]) < 5.0, name
    # mc_samples=S in one step averages S draws (scale 1/S): its error is ~ sd / sqrt(S).
    torch.manual_seed(7)
    pre = KFACPreconditioner(model, fisher_type="mc", mc_samples=100, factor_update_steps=1)
    _factor_step(pre, model, x)
    for name, (_, G) in pre.factors().items():
        se = samples[name].std(0) / 100**0.5
        assert float(((G - exact[name]).abs() / (se + 1e-15)).max()) < 5.0, name
    # The empirical Fisher with fixed labels is a different matrix: the test can fail.
    labels_G = F.one_hot(torch.zeros(6, dtype=torch.long), 3).to(DT)
    p = torch.softmax(_layer_outputs(model, x)["4"], -1)
    empirical = ((p - labels_G).T @ (p - labels_G)) / 6
    assert _within_5_se(samples["4"], empirical) > 5.0


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_sampled_last_layer_G_matches_closed_form(likelihood: str, reduction: str) -> None:
    """Last layer: bernoulli g = sigmoid(f) - y -> E[g g^T] = diag(p(1-p)); gaussian g = (f-y)/v
    -> E[g g^T] = I / v; with output_reduction="mean" the loss averages the C = 3 outputs, so
    g is C times smaller and G C^2 times smaller."""
    model, x, var = _mlp(out=3), torch.randn(6, 4, dtype=DT), 0.25
    samples = _sampled_estimates(
        model, x, k=200, likelihood=likelihood, gaussian_variance=var, output_reduction=reduction
    )
    f = _layer_outputs(model, x)["4"]
    if likelihood == "bernoulli":
        p = torch.sigmoid(f)
        expected = torch.diag((p * (1 - p)).mean(0))
    else:
        expected = torch.eye(3, dtype=DT) / var
    if reduction == "mean":
        expected = expected / 9
    assert _within_5_se(samples["4"], expected) < 5.0
    wrong = expected * 2  # e.g. a sampler that ignored the variance / the probabilities
    assert _within_5_se(samples["4"], wrong) > 5.0


def _nll_param_grad(
    model: nn.Module, pre: KFACPreconditioner, x: Tensor, y: Tensor, weight=None
) -> Tensor:
    nll = pre.mc.nll(model(x), y, weight)
    grads = torch.autograd.grad(nll, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_expected_score_is_zero_enumerated() -> None:
    """The score identity E_{y~p}[grad log p(y|x)] = 0, exactly over all classes."""
    model, x = _mlp(), torch.randn(5, 4, dtype=DT)
    pre = KFACPreconditioner(model, fisher_type="mc")
    with torch.no_grad():
        probs = torch.softmax(model(x), -1)
    total = sum(_nll_param_grad(model, pre, x, torch.full((5,), c), probs[:, c]) for c in range(3))
    scale = float(_nll_param_grad(model, pre, x, torch.zeros(5, dtype=torch.long)).abs().max())
    assert float(total.abs().max()) < 1e-12 * scale


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_expected_score_is_zero_sampled(likelihood: str) -> None:
    """The engine's sampler draws from the model's predictive: mean score within 5 SE of 0."""
    model, x = _mlp(), torch.randn(5, 4, dtype=DT)
    torch.manual_seed(3)
    pre = KFACPreconditioner(model, fisher_type="mc", likelihood=likelihood)
    with torch.no_grad():
        f = model(x)
    grads = torch.stack([_nll_param_grad(model, pre, x, pre.mc._sample(f)[0]) for _ in range(200)])
    assert _within_5_se(grads, torch.zeros_like(grads[0])) < 5.0
    # Labels from the argmax are not the model's distribution: the same check fails.
    if likelihood == "categorical":
        argmax = _nll_param_grad(model, pre, x, f.argmax(-1))
        assert float((argmax.abs() / (grads.std(0) / 200**0.5 + 1e-15)).max()) > 5.0


def test_parameter_gradients_unchanged_by_mc_backward() -> None:
    model, x, y = _mlp(), torch.randn(9, 4, dtype=DT), torch.randint(0, 3, (9,))
    twin = copy.deepcopy(model)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1)
    out = model(x)
    pre.mc_backward()
    F.cross_entropy(out, y).backward()
    F.cross_entropy(twin(x), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_output_module_and_explicit_output() -> None:
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = _mlp(), nn.Linear(3, 3).to(DT)

        def forward(self, x):
            logits = self.head(self.body(x))
            return logits, logits.detach().sum()

    x = torch.randn(4, 4, dtype=DT)
    net = TwoHeads()
    pre = KFACPreconditioner(net, fisher_type="mc", factor_update_steps=1)
    net(x)
    with pytest.raises(RuntimeError, match="output_module"):
        pre.mc_backward()  # a tuple is not a tensor of logits
    pre.remove()
    named = KFACPreconditioner(net, fisher_type="mc", output_module="head", factor_update_steps=1)
    net(x)
    named.mc.backward(enumerate_classes=True)
    named.step()
    named.remove()
    explicit = KFACPreconditioner(net, fisher_type="mc", factor_update_steps=1)
    logits, _ = net(x)
    explicit.mc.backward(logits, enumerate_classes=True)
    explicit.step()
    for name, (A, G) in named.factors().items():
        assert torch.equal(A, explicit.factors()[name][0])
        assert torch.equal(G, explicit.factors()[name][1])
    with pytest.raises(ValueError, match="output_module='nope'"):
        KFACPreconditioner(net, fisher_type="mc", output_module="nope")


def test_clear_errors() -> None:
    model, x = _mlp(out=1), torch.randn(4, 4, dtype=DT)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1)
    model(x)
    with pytest.raises(ValueError, match="likelihood='bernoulli'"):
        pre.mc_backward()  # categorical needs >= 2 classes on the last dimension
    pre.remove()
    model = _mlp()
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=1)
    out = model(x)
    out.sum().backward()
    with pytest.raises(RuntimeError, match=r"BEFORE loss\.backward"):
        pre.mc_backward()
    model.zero_grad()
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="mc_backward"):
        pre.step()  # a backward happened on a factor step, but no mc_backward
    empirical = KFACPreconditioner(_mlp())
    with pytest.raises(ValueError, match="fisher_type='empirical'"):
        empirical.mc_backward()


def test_mc_backward_is_a_no_op_off_factor_steps() -> None:
    model, x = _mlp(), torch.randn(4, 4, dtype=DT)
    pre = KFACPreconditioner(model, fisher_type="mc", factor_update_steps=2, inv_update_steps=2)
    _factor_step(pre, model, x)
    before = {k: (A.clone(), G.clone()) for k, (A, G) in pre.factors().items()}
    _factor_step(pre, model, x)  # t = 1: no capture, nothing kept, nothing changes
    for name, (A, G) in pre.factors().items():
        assert torch.equal(A, before[name][0]) and torch.equal(G, before[name][1])


def _train_steps(pre: KFACPreconditioner, model: nn.Module, opt, data, start: int, stop: int):
    for t in range(start, stop):
        x, y = data[t]
        opt.zero_grad()
        out = model(x)
        pre.mc_backward()
        F.cross_entropy(out, y).backward()
        pre.step(opt)
        opt.step()


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_resume_is_bit_identical(method: str) -> None:
    """The sampling generator's state is part of the state: a resumed run samples the same y~."""
    gen = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(8, 4, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(8)
    ]
    options = dict(
        fisher_type="mc",
        compute_method=method,
        factor_update_steps=1,
        inv_update_steps=3,
        factor_decay=0.5,
        kl_clip=None,
    )

    def fresh():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(42)
        return model, opt, KFACPreconditioner(model, **options)

    model, opt, pre = fresh()
    _train_steps(pre, model, opt, data, 0, 8)
    model2, opt2, pre2 = fresh()
    _train_steps(pre2, model2, opt2, data, 0, 4)
    buffer = io.BytesIO()
    torch.save(
        {"kfac": pre2.state_dict(), "opt": opt2.state_dict(), "model": model2.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model3, opt3, pre3 = fresh()
    torch.manual_seed(999)  # a different global seed must not matter after loading
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    pre3.load_state_dict(saved["kfac"])
    _train_steps(pre3, model3, opt3, data, 4, 8)
    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    for name, block in pre.blocks.items():
        other = pre3.blocks[name]
        assert torch.equal(block.G, other.G)
        for key, value in block.decomposition.items():
            assert torch.equal(value, other.decomposition[key]), (name, key)


datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (a dev extra) is needed")


DIGITS_STEPS = 50


def _digits_loss(fisher: str | None) -> float:
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = (
        None
        if fisher is None
        else KFACPreconditioner(
            model,
            fisher_type=fisher,
            damping=1e-2,
            factor_update_steps=1,
            inv_update_steps=10,
            kl_clip=1e-2,
        )
    )
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(1))
    for t in range(DIGITS_STEPS):
        idx = order.roll(-t * 256)[:256]
        opt.zero_grad()
        out = model(X[idx])
        if pre is not None:
            pre.mc_backward()
        F.cross_entropy(out, y[idx]).backward()
        if pre is not None:
            pre.step(opt)
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(X), y))


def test_digits_mc_fisher_beats_sgd() -> None:
    sgd, mc = _digits_loss(None), _digits_loss("mc")
    assert mc < sgd, (
        f"training loss after {DIGITS_STEPS} steps: K-FAC (mc) + SGD {mc:.4f}, SGD {sgd:.4f}"
    )


# -- through Lightning (KFACCallback calls pre.mc_backward() in on_before_backward) -------------
pl = pytest.importorskip("pytorch_lightning", reason="the callback tests need pytorch_lightning")
from torch.utils.data import TensorDataset  # noqa: E402

from lightning_kfac import KFACCallback  # noqa: E402
from tests.support.lightning import (  # noqa: E402
    MLP,
    assert_factors_equal,
    assert_params_equal,
    clone_module,
    loader,
    make_dataset,
    make_trainer,
)

CLOCKS = dict(damping=1e-2, factor_update_steps=1, inv_update_steps=2, kl_clip=1e-2)


class BernoulliAutoencoder(pl.LightningModule):
    """8 -> 3 -> 8 autoencoder of binary vectors, BCE with logits (bernoulli likelihood)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 8)).to(DT)
        self.lr, self.optimizer_name = 0.1, "sgd"

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        (x,) = batch
        return F.binary_cross_entropy_with_logits(self(x), x)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SkipsBatchOne(MLP):
    """training_step returns None on batch 1: forward ran, no backward (Lightning skips it)."""

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        return None if batch_idx == 1 else loss


def _mc_hand_loop(model, batches, micro: int = 1, skip=(), **options) -> KFACPreconditioner:
    """zero_grad; per micro-batch: forward, pre.mc_backward(), (loss / k).backward(); step."""
    torch.manual_seed(1)
    pre = KFACPreconditioner(model.train(), **options)
    pre.grad_scale = 1.0 / micro
    opt = torch.optim.SGD(model.parameters(), lr=model.lr)
    batches = list(batches)
    for t in range(len(batches) // micro):
        opt.zero_grad()
        for batch in batches[t * micro : (t + 1) * micro]:
            loss = model.loss(batch)
            if t in skip:
                continue
            pre.mc_backward()
            (loss / micro).backward()
        pre.step(opt)
        opt.step()
    pre.remove()
    return pre


def _fit(tmp_path, model, data, callback, **trainer_options):
    trainer = make_trainer(
        tmp_path,
        max_steps=len(data) // trainer_options.get("accumulate_grad_batches", 1),
        callbacks=[callback],
        **trainer_options,
    )
    torch.manual_seed(1)
    trainer.fit(model, data)


@pytest.mark.parametrize("method", ["eigen", "ekfac"])
def test_lightning_bernoulli_autoencoder_equals_hand_loop(tmp_path, method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    data = loader(
        TensorDataset(torch.bernoulli(torch.full((5 * 8, 8), 0.3, dtype=DT), generator=gen)),
        batch_size=8,
    )
    options = dict(CLOCKS, fisher_type="mc", likelihood="bernoulli", compute_method=method)
    model = BernoulliAutoencoder()
    reference = clone_module(model)
    callback = KFACCallback(**options)
    _fit(tmp_path, model, data, callback)
    pre = _mc_hand_loop(reference, data, **options)
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())
    if method == "ekfac":
        for name, block in pre.layers.items():
            live = callback.preconditioner.layers[name].decomposition["scale"]
            assert torch.equal(live, block.decomposition["scale"])


def test_lightning_mc_accumulation_equals_hand_loop(tmp_path) -> None:
    data = loader(make_dataset(4 * 8), batch_size=8)
    options = dict(CLOCKS, fisher_type="mc")
    model = MLP()
    reference = clone_module(model)
    callback = KFACCallback(**options)
    _fit(tmp_path, model, data, callback, accumulate_grad_batches=2)
    pre = _mc_hand_loop(reference, data, micro=2, **options)
    assert callback.preconditioner.steps == pre.steps == 2
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())


def test_lightning_mc_step_without_backward_is_skipped_quietly(tmp_path) -> None:
    """A training_step returning None (no backward, no on_before_backward) drops that step's
    kept outputs instead of raising 'mc_backward() was never called'."""
    data = loader(make_dataset(3 * 8), batch_size=8)
    options = dict(CLOCKS, fisher_type="mc")
    model = SkipsBatchOne()
    reference = clone_module(model)
    callback = KFACCallback(**options)
    _fit(tmp_path, model, data, callback)
    pre = _mc_hand_loop(reference, data, skip=(1,), **options)
    assert_params_equal(model, reference)
    assert_factors_equal(callback.factors(), pre.factors())
    assert callback.preconditioner.counters["factor_updates"] == 2 * 2  # steps 0 and 2 only


def test_mc_keeps_the_low_rank_path_exact() -> None:
    """The sampled-loss backward must not feed the low-rank rows (core/lowrank.py) with its
    gradients: with fisher_type="mc" the rank-R path still runs and equals the full path."""
    grads = {}
    for low_rank in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).to(DT)
        torch.manual_seed(5)
        pre = KFACPreconditioner(
            model, fisher_type="mc", low_rank=low_rank, factor_update_steps=1, inv_update_steps=1
        )
        x, y = torch.randn(4, 64, dtype=DT), torch.randint(0, 10, (4,))
        out = model(x)
        pre.mc_backward()
        F.cross_entropy(out, y).backward()
        pre.step()
        grads[low_rank] = [p.grad.clone() for p in model.parameters()]
        if low_rank:
            assert pre.counters.get("low_rank_steps", 0) == 2
    for fast, full in zip(grads[True], grads[False]):
        assert torch.allclose(fast, full, rtol=1e-10, atol=1e-14)
