"""Memory: factor / decomposition bytes against the formula, no growth, nothing captured kept.

Must hold (docs/reliability.md, "memory soak"): the running factors of a layer hold
exactly ``(d_A^2 + d_G^2) x bytes``; ``pre.memory_bytes()`` (factors + decompositions) equals
``lightning_kfac.summary.predicted_memory_bytes`` and the registration summary reports it; the
tensors reachable from the engine between steps total exactly that (no hidden copies, no
captured activation or output gradient kept after ``step()``); over a long run neither the
engine's bytes nor the process's live tensors nor the model's hook counts grow.
A 200-step CNN run is in the fast set; the 2,000-step soak is marked slow.
"""

from __future__ import annotations

import gc
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from lightning_kfac.summary import _bytes, predicted_memory_bytes
from tests.reliability.common import batch, small_cnn

pytestmark = pytest.mark.reliability


def engine_tensors(pre) -> dict[int, Tensor]:
    """Tensors reachable from the engine object, not through the model or the optimizer."""
    seen: set[int] = set()
    found: dict[int, Tensor] = {}
    stack = [pre]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(
            obj, (nn.Module, torch.optim.Optimizer, type, types.ModuleType)
        ):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            found[id(obj)] = obj
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not callable(obj):
            stack.extend(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            stack.extend(getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s))
    return found


def held_bytes(pre) -> int:
    storages = {}
    for t in engine_tensors(pre).values():
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def live_tensors() -> int:
    """Tensors alive in the whole process (isinstance on some torch proxies warns: ignored)."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, Tensor))


def hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def _steps(model, pre, opt, start: int, stop: int, keep: list | None = None) -> Iterator[int]:
    for t in range(start, stop):
        opt.zero_grad()
        x, y = batch(t, n=8, shape=(1, 8, 8), classes=10)
        handles = []
        if keep is not None:  # keep the captured tensors alive here, so no address is reused

            def hook(mod, args, out):
                keep.extend([args[0], out])
                out.register_hook(keep.append)

            handles = [
                m.register_forward_hook(hook)
                for m in pre.model.modules()
                if isinstance(m, (nn.Conv2d, nn.Linear))
            ]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        for h in handles:
            h.remove()
        pre.step(opt)
        opt.step()
        yield t


@pytest.mark.parametrize("method", ["eigen", "inverse", "ekfac"])
def test_factor_memory_equals_formula(method, reliability_row) -> None:
    model = small_cnn()
    pre = KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=1, compute_method=method
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    captured: list = []
    for _ in _steps(model, pre, opt, 0, 3, keep=captured):
        pass
    factor_bytes = sum(
        t.numel() * t.element_size() for b in pre.layers.values() for t in (b.A, b.G)
    )
    formula = sum((b.kind.a_dim() ** 2 + b.kind.g_dim() ** 2) * 4 for b in pre.layers.values())
    predicted = predicted_memory_bytes(pre.layers)
    held = held_bytes(pre)
    held_ptrs = {t.untyped_storage().data_ptr() for t in engine_tensors(pre).values()}
    leaked = {t.untyped_storage().data_ptr() for t in captured} & held_ptrs
    assert factor_bytes == formula
    assert pre.memory_bytes() == predicted, (pre.memory_bytes(), predicted)
    assert _bytes(predicted) in pre.summary()
    assert not leaked, "a captured activation / output gradient is still held after step()"
    assert held == predicted, f"engine holds {held} B, formula {predicted} B"
    reliability_row("memory soak", 1, 1, f"{method}: held = predicted = {predicted} B")


def _soak(steps: int, reliability_row) -> None:
    torch.manual_seed(0)
    model = small_cnn()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=10, kl_clip=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    warm = 20
    for _ in _steps(model, pre, opt, 0, warm):
        pass
    base_held, base_live, base_hooks = held_bytes(pre), live_tensors(), hook_count(model)
    peak = base_held
    for t in _steps(model, pre, opt, warm, steps):
        if t % 50 == 0:
            peak = max(peak, held_bytes(pre))
            assert hook_count(model) == base_hooks
    end_held, end_live = held_bytes(pre), live_tensors()
    predicted = predicted_memory_bytes(pre.layers)
    assert peak == end_held == base_held == predicted
    assert end_live <= base_live, f"live tensors grew from {base_live} to {end_live}"
    reliability_row(
        "memory soak",
        1,
        1,
        f"{steps} steps: peak held {peak} B = predicted, live tensors {base_live}->{end_live}",
    )


def test_memory_no_growth_200_steps(reliability_row) -> None:
    _soak(200, reliability_row)


@pytest.mark.slow
def test_memory_no_growth_2000_steps(reliability_row) -> None:
    _soak(2000, reliability_row)
