"""State round trip and the resume sweep (engine level, plain PyTorch loop).

Must hold (docs/reliability.md, "state round trip", "resume sweep"; docs/conventions.md: a resumed
run continues bit-identically): save model + optimizer + ``pre.state_dict()``, load them into fresh
objects with ``torch.load(weights_only=True)`` and continue; every tensor (parameters, optimizer
state, factors, decompositions, scalings) is ``torch.equal`` to an uninterrupted run. The sweep
crashes after each step of one inverse interval (factor_update_steps=2, inv_update_steps=4), runs
two more steps that are lost, then resumes and runs 20 more.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac import KFACConfig, KFACPreconditioner
from tests.reliability.common import batch, small_cnn

pytestmark = pytest.mark.reliability

FUS, INV = 2, 4
CRASH_STEPS = [8, 9, 10, 11]  # one inverse interval: 8 decomposes, 9-11 reuse it
MORE = 20

VARIANTS = {
    "eigen+SGD-momentum": (
        {"compute_method": "eigen"},
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    ),
    "inverse+Adam": ({"compute_method": "inverse"}, lambda p: torch.optim.Adam(p, lr=1e-3)),
    "ekfac+AdamW": ({"compute_method": "ekfac"}, lambda p: torch.optim.AdamW(p, lr=1e-3)),
    "mc-fisher+SGD": ({"fisher_type": "mc"}, lambda p: torch.optim.SGD(p, lr=0.05)),
    "damping-schedule": (
        {"damping_schedule": "exponential", "damping_decay": 0.8, "damping_step_size": 3},
        lambda p: torch.optim.SGD(p, lr=0.05),
    ),
}


def _make(variant: str):
    options, make_opt = VARIANTS[variant]
    model = small_cnn()
    opt = make_opt(model.parameters())
    pre = KFACPreconditioner(
        model, factor_update_steps=FUS, inv_update_steps=INV, damping=1e-2, kl_clip=1e-2, **options
    )
    return model, opt, pre


def _train(model, opt, pre, start: int, stop: int) -> None:
    for t in range(start, stop):
        opt.zero_grad()
        x, y = batch(t, n=8, shape=(1, 8, 8), classes=10)
        out = model(x)
        if pre.config.fisher_type == "mc":
            pre.mc_backward()
        F.cross_entropy(out, y).backward()
        pre.step(opt)
        opt.step()


def _checkpoint(model, opt, pre) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "kfac": pre.state_dict()}


def _leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (path, leaf) of a nested dict/list structure."""
    if isinstance(obj, dict):
        return [
            x
            for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
            for x in _leaves(v, f"{prefix}/{k}")
        ]
    if isinstance(obj, (list, tuple)):
        return [x for i, v in enumerate(obj) for x in _leaves(v, f"{prefix}/{i}")]
    return [(prefix, obj)]


def mismatches(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Paths whose tensors are not ``torch.equal`` (or whose other leaves differ)."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    bad = sorted(set(la) ^ set(lb))
    for path in set(la) & set(lb):
        x, y = la[path], lb[path]
        if isinstance(x, torch.Tensor):
            same = isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, float) and isinstance(y, float):
            same = x == y or (math.isnan(x) and math.isnan(y))
        else:
            same = x == y
        if not same:
            bad.append(path)
    return bad


def _resume(variant: str, crash: int, via_bytes: bool, total: int) -> dict[str, Any]:
    model, opt, pre = _make(variant)
    _train(model, opt, pre, 0, crash)
    saved = _checkpoint(model, opt, pre)
    if via_bytes:
        buffer = io.BytesIO()
        torch.save(saved, buffer)
    else:  # in memory: the K-FAC state must not alias live tensors (the lost steps mutate them)
        saved = {
            "model": copy.deepcopy(saved["model"]),
            "optimizer": copy.deepcopy(saved["optimizer"]),
            "kfac": saved["kfac"],
        }
    _train(model, opt, pre, crash, crash + 2)  # work lost in the crash
    del model, opt, pre
    if via_bytes:
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
    model, opt, pre = _make(variant)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    pre.load_state_dict(saved["kfac"])
    _train(model, opt, pre, crash, total)
    return _checkpoint(model, opt, pre)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_sweep_bit_identical(variant, reliability_row) -> None:
    total = max(CRASH_STEPS) + MORE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, opt, pre = _make(variant)
        _train(model, opt, pre, 0, total)
        reference = _checkpoint(model, opt, pre)
        assert pre.counters["decompositions"] > 0 and pre.factors()
        passing, failures = 0, {}
        for i, crash in enumerate(CRASH_STEPS):
            bad = mismatches(_resume(variant, crash, via_bytes=i % 2 == 0, total=total), reference)
            passing += not bad
            if bad:
                failures[crash] = bad[:5]
    reliability_row(
        "resume sweep",
        len(CRASH_STEPS),
        passing,
        f"steps passing / tried: {passing}/{len(CRASH_STEPS)} per variant",
    )
    assert not failures, f"{variant}: crash step -> mismatched tensors {failures}"


def test_state_round_trip_weights_only(reliability_row) -> None:
    """10 steps, save, load into fresh objects (weights_only=True), 10 more == 20 uninterrupted."""
    model, opt, pre = _make("eigen+SGD-momentum")
    _train(model, opt, pre, 0, 20)
    reference = _checkpoint(model, opt, pre)
    model, opt, pre = _make("eigen+SGD-momentum")
    _train(model, opt, pre, 0, 10)
    buffer = io.BytesIO()
    torch.save(_checkpoint(model, opt, pre), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model, opt, pre = _make("eigen+SGD-momentum")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    pre.load_state_dict(state["kfac"])
    assert pre.steps == 10 and set(pre.factors()) == set(state["kfac"]["layers"])
    _train(model, opt, pre, 10, 20)
    bad = mismatches(_checkpoint(model, opt, pre), reference)
    reliability_row("state round trip", 1, int(not bad), f"mismatched tensors {len(bad)}")
    assert not bad, bad


def test_load_refuses_foreign_state(reliability_row) -> None:
    """A state from another model is refused with a ValueError naming the layers, not ignored."""
    model, opt, pre = _make("eigen+SGD-momentum")
    _train(model, opt, pre, 0, 2)
    other = KFACPreconditioner(small_cnn(), KFACConfig(skip_layers=["conv1"]))
    with pytest.raises(ValueError, match="conv1"):
        other.load_state_dict(pre.state_dict())
    reliability_row("state round trip", 1, 1, "")
