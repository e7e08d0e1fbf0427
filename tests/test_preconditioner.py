"""KFACPreconditioner behaviour against brute force: running averages, the two clocks,
skip_layers, frozen layers, remove(), huge damping, micro-batches, state round trip, wrap().

Conventions are those of docs/conventions.md (Martens & Grosse 2015, sec. 5 for the running
averages, sec. 6.3 for damping); references come from ``tests/support/dense.py``.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from tests.support import dense as D

NAMES = ["0", "2"]


def _mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def _batch(t: int, n: int = 8, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1000 + t)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def _pass(model: nn.Module, x: Tensor, y: Tensor, names=NAMES):
    """Forward/backward with recording; return brute-force factors and raw grad W~."""
    model.zero_grad()
    with D.record(model, names) as store:
        F.cross_entropy(model(x), y).backward()
    modules = dict(model.named_modules())
    return D.brute_factors(model, store), {n: D.grad_matrix(modules[n]) for n in names}


def _close(x: Tensor, ref: Tensor, tol: float = 1e-10) -> bool:
    return D.rel_err(x, ref) <= tol


def test_running_average_second_update() -> None:
    """First update A = A^ (no bias to 0 or I); then A <- decay A + (1 - decay) A^."""
    model, decay = _mlp(), 0.7
    pre = KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=1, factor_decay=decay, kl_clip=None
    )
    brute0, _ = _pass(model, *_batch(0))
    pre.step()
    first = pre.factors()
    brute1, _ = _pass(model, *_batch(1))
    pre.step()
    second = pre.factors()
    for n in NAMES:
        for i in range(2):
            assert _close(first[n][i], brute0[n][i])
            assert _close(second[n][i], decay * brute0[n][i] + (1 - decay) * brute1[n][i])


def test_update_clocks_factors_every_2_decompositions_every_4() -> None:
    """Factors change only at t % 2 == 0 (capturing only those passes); the gradient is
    preconditioned with the decomposition of the factors as they were at the last t % 4 == 0."""
    model, decay, damping = _mlp(), 0.6, 0.05
    pre = KFACPreconditioner(
        model,
        factor_update_steps=2,
        inv_update_steps=4,
        factor_decay=decay,
        damping=damping,
        kl_clip=None,
    )
    modules = dict(model.named_modules())
    expected = decomposed = None
    last = (pre.counters["factor_updates"], pre.counters["decompositions"])
    for t in range(10):
        brute, raw = _pass(model, *_batch(t))
        pre.step()
        if t % 2 == 0:
            expected = (
                brute
                if expected is None
                else {
                    n: tuple(decay * e + (1 - decay) * b for e, b in zip(expected[n], brute[n]))
                    for n in NAMES
                }
            )
        if t % 4 == 0:
            decomposed = expected
        factors = pre.factors()
        for n in NAMES:
            assert _close(factors[n][0], expected[n][0]) and _close(
                factors[n][1], expected[n][1]
            ), t
            P_ref = D.eigen_precondition(*decomposed[n], raw[n], damping)
            assert _close(D.grad_matrix(modules[n]), P_ref, 1e-8), (t, n)
            if t % 4 == 2:  # the factors moved on but the decomposition in use must not have
                P_new = D.eigen_precondition(*expected[n], raw[n], damping)
                assert not _close(D.grad_matrix(modules[n]), P_new, 1e-6), (t, n)
        # the counters move exactly on the clock's steps (per step or per layer, either way)
        counts = (pre.counters["factor_updates"], pre.counters["decompositions"])
        assert (counts[0] > last[0], counts[1] > last[1]) == (t % 2 == 0, t % 4 == 0), t
        last = counts
        assert pre.steps == t + 1


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3)
        self.body = nn.Linear(18, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(torch.tanh(self.conv(x)).flatten(1))))


@pytest.mark.parametrize(
    "skip,skipped",
    [
        (["hea"], {"head"}),  # searched in the qualified name
        (["^Conv1d$"], {"conv"}),  # matched against the class name
        (["Linear"], {"body", "head"}),
    ],
    ids=["name", "class", "class-two"],
)
def test_skip_layers(skip: list[str], skipped: set) -> None:
    torch.manual_seed(0)
    model = _Net().double()
    names = ["conv", "body", "head"]
    damping = 0.1
    pre = KFACPreconditioner(
        model,
        skip_layers=skip,
        damping=damping,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
    )
    x, y = torch.randn(4, 2, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    brute, raw = _pass(model, x, y, names)
    pre.step()
    factors = pre.factors()
    assert set(factors) == set(names) - skipped
    modules = dict(model.named_modules())
    for n in names:
        got = D.grad_matrix(modules[n])
        if n in skipped:
            assert torch.equal(got, raw[n]), n
        else:
            assert _close(got, D.eigen_precondition(*factors[n], raw[n], damping), 1e-8), n
            assert _close(factors[n][0], brute[n][0]) and _close(factors[n][1], brute[n][1])


def test_frozen_layer_not_preconditioned_and_untouched() -> None:
    model, damping = _mlp(), 0.1
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    pre = KFACPreconditioner(
        model, damping=damping, factor_update_steps=1, inv_update_steps=1, kl_clip=None
    )
    brute, raw = _pass(model, *_batch(0), names=["2"])
    pre.step(opt)
    assert set(pre.factors()) == {"2"}
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert _close(
        D.grad_matrix(model[2]), D.eigen_precondition(*brute["2"], raw["2"], damping), 1e-8
    )
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), frozen))


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _output_tensor_hooks(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Number of tensor (backward) hooks on the Linear outputs after a training forward."""
    with D.record(model, NAMES) as store:
        loss = F.cross_entropy(model(x), y)
    count = sum(len(out._backward_hooks or {}) for n in NAMES for _, out in store[n])
    loss.backward()
    return count


def test_remove_leaves_no_hooks_and_captures_nothing() -> None:
    model = _mlp()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    assert _hook_count(model) > 0
    assert _output_tensor_hooks(model, *_batch(0)) >= len(NAMES)
    pre.step()
    before = pre.factors()
    pre.remove()
    assert _hook_count(model) == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # a further training forward/backward registers nothing and changes no factor
    assert _output_tensor_hooks(model, *_batch(1)) == 0
    after = pre.factors()
    assert all(torch.equal(before[n][i], after[n][i]) for n in NAMES for i in range(2))


def test_huge_damping_is_scaled_plain_step() -> None:
    """(A (x) G + d I)^-1 -> I / d as d -> inf: K-FAC+SGD(lr d) equals SGD(lr) on raw grads."""
    damping, lr = 1e8, 0.1
    model, plain = _mlp(), _mlp()
    pre = KFACPreconditioner(
        model,
        damping=damping,
        compute_method="eigen",
        kl_clip=None,
        factor_update_steps=1,
        inv_update_steps=1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr * damping)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=lr)
    x, y = _batch(0)
    _, raw = _pass(model, x, y)
    pre.step(opt)
    for n in NAMES:
        assert D.rel_err(D.grad_matrix(model[int(n)]) * damping, raw[n]) <= 1e-6, n
    opt.step()
    _pass(plain, x, y)
    opt_plain.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert D.rel_err(p, q) <= 1e-6


class _ConvLin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def test_micro_batches_merge_into_one_batch_estimate() -> None:
    """Two half batches, each loss x 0.5 with grad_scale=0.5, then one step() == one full batch."""
    x, y = torch.randn(8, 2, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    results = []
    for micro in (1, 2):
        torch.manual_seed(0)
        model = _ConvLin().double()
        pre = KFACPreconditioner(
            model, damping=0.05, factor_update_steps=1, inv_update_steps=1, kl_clip=None
        )
        size = 8 // micro
        for k in range(micro):
            pre.grad_scale = 1.0 / micro
            sl = slice(k * size, (k + 1) * size)
            (F.cross_entropy(model(x[sl]), y[sl]) / micro).backward()
        pre.step()
        results.append(
            (pre.factors(), {n: D.grad_matrix(getattr(model, n)) for n in ("conv", "fc")})
        )
    (f1, g1), (f2, g2) = results
    for n in ("conv", "fc"):
        assert _close(f2[n][0], f1[n][0], 1e-12) and _close(f2[n][1], f1[n][1], 1e-12), n
        assert _close(g2[n], g1[n], 1e-10), n


def _train(model, pre, opt, steps: range) -> None:
    for t in steps:
        x, y = _batch(t, dtype=torch.float32)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step(opt)
        opt.step()


def _fresh(seed: int):
    model = _mlp(seed, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(
        model,
        damping=0.01,
        factor_update_steps=1,
        inv_update_steps=5,
        factor_decay=0.9,
        kl_clip=1e-2,
    )
    return model, pre, opt


def test_state_round_trip_is_bit_identical() -> None:
    """7 steps, save, load into fresh objects (weights_only=True), 6 more == 13 uninterrupted;
    the resume falls inside an inverse interval (decompositions at 0, 5, 10)."""
    ref_model, ref_pre, ref_opt = _fresh(0)
    _train(ref_model, ref_pre, ref_opt, range(13))

    model, pre, opt = _fresh(0)
    _train(model, pre, opt, range(7))
    buf = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "kfac": pre.state_dict(), "opt": opt.state_dict()}, buf
    )
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2, pre2, opt2 = _fresh(123)  # different initial weights: everything must come from state
    model2.load_state_dict(state["model"])
    pre2.load_state_dict(state["kfac"])
    opt2.load_state_dict(state["opt"])
    assert pre2.steps == 7
    _train(model2, pre2, opt2, range(7, 13))

    for (name, p), q in zip(ref_model.named_parameters(), model2.parameters()):
        assert torch.equal(p, q), name
    ref_f, f = ref_pre.factors(), pre2.factors()
    assert set(ref_f) == set(f) == set(NAMES)
    for n in NAMES:
        assert torch.equal(ref_f[n][0], f[n][0]) and torch.equal(ref_f[n][1], f[n][1]), n
    assert dict(ref_pre.counters) == dict(pre2.counters)


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_wrap_equals_step_then_optimizer_step(kl_clip) -> None:
    params = []
    for wrapped in (False, True):
        model = _mlp(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
        pre = KFACPreconditioner(
            model, damping=0.02, factor_update_steps=1, inv_update_steps=2, kl_clip=kl_clip
        )
        stepper = pre.wrap(opt) if wrapped else None
        for t in range(4):
            x, y = _batch(t)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if wrapped:
                stepper.step()
            else:
                pre.step(opt)
                opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(*params))
