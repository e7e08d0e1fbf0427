"""``stagger_refresh=True``: cost-balanced refresh offsets (core/stagger.py), checked in the engine.

Every layer is decomposed at t = 0; from the second period on, layer i is decomposed exactly at
``k M + o_i`` (k >= 1), where the offsets are factor-update steps balancing d_A^3 + d_G^3; the
decomposition in use is always the one of the factors at the layer's last refresh (dense
reference), and no step after t = 0 decomposes every layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACConfig, KFACPreconditioner
from lightning_kfac.core import stagger
from tests.support import dense as D

DT = torch.float64


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 10),
        nn.Tanh(),
        nn.Linear(10, 8),
        nn.Tanh(),
        nn.Linear(8, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).to(DT)


def test_offsets_balance_costs_on_the_factor_clock() -> None:
    pre = KFACPreconditioner(
        _net(), factor_update_steps=2, inv_update_steps=8, stagger_refresh=True
    )
    offsets = stagger.refresh_offsets(pre.blocks.values(), 2, 8)
    # costs 13^3+10^3, 11^3+8^3, 9^3+6^3, 7^3+3^3: one layer per slot 0, 2, 4, 6 (largest first)
    assert offsets == {"0": 0, "2": 2, "4": 4, "6": 6}
    due = {t: [n for n, o in offsets.items() if stagger.due(o, 8, t)] for t in range(40)}
    assert due[0] == ["0", "2", "4", "6"]
    for t in range(1, 40):
        assert len(due[t]) <= 1  # no later step decomposes every layer
    for name, o in offsets.items():
        assert [t for t in range(40) if name in due[t]] == [0] + [
            k * 8 + o for k in (1, 2, 3, 4) if k * 8 + o < 40
        ]


def test_engine_refreshes_each_layer_on_its_offset_with_its_current_factors() -> None:
    model = _net()
    damping = 1e-2
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=4,
        damping=damping,
        kl_clip=None,
        stagger_refresh=True,
    )
    offsets = stagger.refresh_offsets(pre.blocks.values(), 1, 4)
    assert sorted(offsets.values()) == [0, 1, 2, 3]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    modules = dict(model.named_modules())
    refreshed_factors = {}
    gen = torch.Generator().manual_seed(1)
    for t in range(13):
        opt.zero_grad()
        x, y = torch.randn(9, 12, generator=gen, dtype=DT), torch.randint(0, 3, (9,), generator=gen)
        F.cross_entropy(model(x), y).backward()
        raw = {n: D.grad_matrix(modules[n]) for n in pre.blocks}
        before = pre.counters["decompositions"]
        pre.step(opt)
        due = [n for n in pre.blocks if t == 0 or (t >= 4 and (t - offsets[n]) % 4 == 0)]
        assert pre.counters["decompositions"] - before == len(due), t
        for name, block in pre.blocks.items():
            if name in due:
                refreshed_factors[name] = (block.A.clone(), block.G.clone())
            A, G = refreshed_factors[name]
            ref = D.eigen_precondition(A, G, raw[name], damping)
            assert D.rel_err(D.grad_matrix(modules[name]), ref) < 1e-9, (t, name)
        opt.step()


def test_option_is_validated_and_off_by_default() -> None:
    assert KFACConfig().stagger_refresh is False
    with pytest.raises(ValueError, match="stagger_refresh"):
        KFACConfig(stagger_refresh="yes")
