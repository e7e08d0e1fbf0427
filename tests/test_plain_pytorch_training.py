"""Plain PyTorch loop on scikit-learn's digits: K-FAC+SGD reaches a lower training loss than
SGD alone with the same learning rate and number of steps (fixed seeds; an ordering, no timing).

The loop the engine documents: ``loss.backward(); pre.step(optimizer); optimizer.step()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner

datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn (a dev extra) is needed")

STEPS, LR, BATCH = 100, 0.05, 256


def _data():
    X, y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-6)  # standardize; constant pixels stay 0
    return X, torch.tensor(y)


def _train(use_kfac: bool) -> float:
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    pre = (
        KFACPreconditioner(
            model, damping=1e-2, factor_update_steps=1, inv_update_steps=10, kl_clip=1e-2
        )
        if use_kfac
        else None
    )
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(1))
    for t in range(STEPS):
        idx = order.roll(-t * BATCH)[:BATCH]
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        if pre is not None:
            pre.step(opt)
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(X), y))


def test_kfac_beats_sgd_on_digits() -> None:
    sgd, kfac = _train(False), _train(True)
    assert kfac < sgd, f"training loss after {STEPS} steps: K-FAC+SGD {kfac:.4f}, SGD {sgd:.4f}"
