"""Trainability that changes during a fit (core/trainability.py).

- Lightning's ``BackboneFinetuning`` freezes ``pl_module.backbone`` in ``setup`` and adds it to the
  optimizer at ``unfreeze_backbone_at_epoch``: the fit-start summary lists the backbone as
  "frozen (for now)"; while frozen it has no factors and no gradients; from the first step after
  unfreezing its gradient is the engine's damped inverse applied to the raw gradient,
  ``vec(P) = (A (x) G + damping I)^-1 vec(grad)``, checked against a dense float64 solve from the
  engine's own factors, with ``inv_update_steps`` far away (the first decomposition is due at the
  first factor update, not at the next refresh step).
- ``requires_grad_(True)`` mid-fit in a plain loop: preconditioned from the next factor update.
- Frozen again or removed from the optimizer: factors and gradients are no longer touched.
- A bias that becomes frozen changes ``dim A``: the factors restart from the next estimate.
"""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning, Callback
from torch import nn

from lightning_kfac import KFACCallback, KFACPreconditioner
from tests.support import dense as D
from tests.support.lightning import loader, make_dataset, make_trainer

DAMPING = 1e-2
CLOCKS = dict(factor_update_steps=1, inv_update_steps=100, kl_clip=None, damping=DAMPING)


class Finetuned(pl.LightningModule):
    """``backbone`` (Linear -> Tanh) then ``head`` (Linear); optimizer over trainable params only,
    as BackboneFinetuning requires."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.Tanh()).double()
        self.head = nn.Linear(8, 3).double()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class GradProbe(Callback):
    """Before (``when="raw"``) or after (``"pre"``) KFACCallback in the list: keeps
    ``backbone.0``'s gradient matrix at every optimizer step, and after K-FAC its factors."""

    def __init__(self, when: str, kfac: KFACCallback = None):
        self.when, self.kfac, self.records = when, kfac, {}
        self.summary = None

    def on_fit_start(self, trainer, pl_module):
        if self.kfac is not None:
            self.summary = self.kfac.preconditioner.summary()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layer = pl_module.backbone[0]
        grad = None if layer.weight.grad is None else D.grad_matrix(layer)
        record = {"grad": grad}
        if self.kfac is not None:
            block = self.kfac.preconditioner.layers["backbone.0"]
            record["A"] = None if block.A is None else block.A.clone()
            record["G"] = None if block.G is None else block.G.clone()
        self.records[trainer.global_step] = record


def test_backbone_finetuning_preconditions_backbone_after_unfreezing(tmp_path):
    model, kfac = Finetuned(), KFACCallback(**CLOCKS)
    raw, pre = GradProbe("raw"), GradProbe("pre", kfac)
    finetune = BackboneFinetuning(
        unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0, initial_denom_lr=1.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, max_epochs=2, callbacks=[finetune, raw, kfac, pre]).fit(
            model, loader(make_dataset(24), 8)
        )  # 3 steps per epoch
    lines = {line.split()[0]: line for line in pre.summary.splitlines() if line.strip()}
    assert "frozen (for now)" in lines["backbone.0"] and "frozen" not in lines["head"]
    for t in (0, 1, 2):  # epoch 0: frozen, no gradient and no factors
        assert raw.records[t]["grad"] is None and pre.records[t]["A"] is None
    # epoch 1 (steps 3, 4, 5): factors from step 3 on; the decomposition of step 3's factors is
    # in use at steps 3..5 (inv_update_steps=100: no refresh), each gradient preconditioned by it.
    A3, G3 = pre.records[3]["A"], pre.records[3]["G"]
    assert A3 is not None and A3.shape == (7, 7) and G3.shape == (8, 8)
    assert not torch.equal(pre.records[4]["A"], A3)  # factors keep updating every step
    for t in (3, 4, 5):
        expected = D.eigen_precondition(A3, G3, raw.records[t]["grad"], DAMPING)
        assert D.rel_err(pre.records[t]["grad"], expected) <= 1e-10, t
        assert D.rel_err(raw.records[t]["grad"], expected) > 1e-2  # really changed
    assert "backbone.0" in kfac.factors()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def _batch(t: int):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(
        0, 2, (16,), generator=gen
    )


def _step(model, pre, opt, t):
    opt.zero_grad()
    x, y = _batch(t)
    F.cross_entropy(model(x), y).backward()
    raw = {
        n: D.grad_matrix(model[i])
        for n, i in (("0", 0), ("2", 2))
        if model[i].weight.grad is not None
    }
    snapshot = {n: (b.A.clone(), b.G.clone()) for n, b in pre.layers.items() if b.A is not None}
    pre.step(opt)
    after = {n: (b.A.clone(), b.G.clone()) for n, b in pre.layers.items() if b.A is not None}
    opt.step()
    return raw, snapshot, after


def test_requires_grad_mid_fit_preconditioned_from_next_factor_update():
    model = _mlp()
    model[0].requires_grad_(False)
    pre = KFACPreconditioner(
        model, factor_update_steps=2, inv_update_steps=50, kl_clip=None, damping=DAMPING
    )
    assert "frozen (for now)" in next(
        row for row in pre.summary().splitlines() if row.startswith("0 ")
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for t in range(3):
        _step(model, pre, opt, t)
    assert pre.layers["0"].A is None and pre.layers["2"].A is not None
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters())})
    raw, _, after = _step(model, pre, opt, 3)  # not a factor-update step: raw gradient kept
    assert pre.layers["0"].A is None and torch.equal(D.grad_matrix(model[0]), raw["0"])
    raw, _, after = _step(model, pre, opt, 4)  # factor update: factors, decomposition, P
    A, G = after["0"]
    expected = D.eigen_precondition(A, G, raw["0"], DAMPING)
    assert D.rel_err(D.grad_matrix(model[0]), expected) <= 1e-10

    # frozen again: no capture, no factor update, gradient untouched (there is none)
    model[0].requires_grad_(False)
    model[0].weight.grad = model[0].bias.grad = None
    _step(model, pre, opt, 5)
    _, before, after = _step(model, pre, opt, 6)  # a factor-update step (engine clock t=6)
    assert model[0].weight.grad is None
    assert torch.equal(before["0"][0], after["0"][0]) and torch.equal(before["0"][1], after["0"][1])
    assert not torch.equal(before["2"][0], after["2"][0])  # the other layer still updates


def test_layer_leaving_the_optimizer_is_not_touched():
    model = _mlp()
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1, kl_clip=None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, pre, opt, 0)
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)  # layer 0 left the optimizer
    raw, before, after = _step(model, pre, opt, 1)
    assert torch.equal(D.grad_matrix(model[0]), raw["0"])  # raw gradient kept
    assert torch.equal(before["0"][0], after["0"][0]) and torch.equal(before["0"][1], after["0"][1])
    assert not torch.equal(D.grad_matrix(model[2]), raw["2"])


def test_bias_frozen_mid_fit_restarts_the_factors():
    model = _mlp()
    pre = KFACPreconditioner(
        model, factor_update_steps=1, inv_update_steps=1, kl_clip=None, damping=DAMPING
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _step(model, pre, opt, 0)
    assert pre.layers["0"].A.shape == (6, 6)  # in + 1 (bias)
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    raw, _, after = _step(model, pre, opt, 1)
    A, G = after["0"]
    assert A.shape == (5, 5)
    x, _ = _batch(1)
    assert D.rel_err(A, x.T @ x / x.shape[0]) <= 1e-12  # restarted: this batch's estimate alone
    assert (
        D.rel_err(D.grad_matrix(model[0]), D.eigen_precondition(A, G, raw["0"][:, :5], DAMPING))
        <= 1e-10
    )
