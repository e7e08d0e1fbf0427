"""``KFACCallback(step_rule="quadratic")`` in a real Trainer (lightning_kfac/step_rule.py).

Recorder callbacks before and after the K-FAC callback see the raw gradients, the parameters
after K-FAC's ``on_before_optimizer_step`` and after the optimizer's step. Against a dense float64
computation from the recorded factors: the preconditioned parameters move by exactly
``alpha Delta + mu delta_0`` with ``Delta = -(A (x) G + lambda I)^-1 (grad + eta theta)``, the
optimizer (SGD, momentum, weight decay) leaves them alone (no gradient, no state), and the
skipped layer gets SGD's own step.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACCallback
from tests.support import dense as D

LR, WD, MOMENTUM, LAMBDA = 0.05, 1e-3, 0.9, 0.1
PRECONDITIONED = ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]


class Classifier(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about K-FAC."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


class Recorder(pl.Callback):
    def __init__(self, when: str):
        self.when, self.steps = when, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        if self.when == "before":
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
            self.steps.append({"params": params, "grads": grads})
            return
        kfac = next(cb for cb in trainer.callbacks if isinstance(cb, KFACCallback))
        self.steps.append(
            {
                "moved": params,
                "factors": kfac.factors(),
                "damping": kfac.preconditioner.damping,
                "stats": dict(kfac.preconditioner.last_stats),
                "grad_none": [n for n, p in pl_module.named_parameters() if p.grad is None],
                "state": {n for n, p in pl_module.named_parameters() if p in optimizer.state},
            }
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.when == "after":
            self.steps[-1]["final"] = {
                n: p.detach().clone() for n, p in pl_module.named_parameters()
            }


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(callbacks, **kwargs):
    return pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=callbacks,
        **kwargs,
    )


def test_callback_moves_preconditioned_params_by_alpha_delta_plus_mu_delta0():
    torch.manual_seed(0)
    model = Classifier().double()
    before, after = Recorder("before"), Recorder("after")
    kfac = KFACCallback(
        step_rule="quadratic",
        damping=LAMBDA,
        factor_update_steps=1,
        inv_update_steps=1,
        kl_clip=None,
        low_rank=False,
        skip_layers=["^net.4$"],
    )
    _trainer([before, kfac, after]).fit(model, _loader())
    assert len(before.steps) == len(after.steps) == 3
    previous = {n: torch.zeros_like(before.steps[0]["params"][n]) for n in PRECONDITIONED}
    for step, (b, a) in enumerate(zip(before.steps, after.steps)):
        theta, grads = b["params"], b["grads"]
        alpha, mu = a["stats"]["alpha"], a["stats"]["mu"]
        assert alpha > 0 and (mu == 0.0) == (step == 0)
        for layer in ("net.0", "net.2"):
            A, G = a["factors"][layer]
            g = D.weight_matrix(
                grads[f"{layer}.weight"] + WD * theta[f"{layer}.weight"],
                grads[f"{layer}.bias"] + WD * theta[f"{layer}.bias"],
            )
            Delta = -D.eigen_precondition(A, G, g, a["damping"])
            expected = alpha * Delta + mu * D.weight_matrix(
                previous[f"{layer}.weight"], previous[f"{layer}.bias"]
            )
            moved = D.weight_matrix(
                a["moved"][f"{layer}.weight"] - theta[f"{layer}.weight"],
                a["moved"][f"{layer}.bias"] - theta[f"{layer}.bias"],
            )
            assert D.rel_err(moved, expected) <= 1e-9
        for n in PRECONDITIONED:  # the optimizer left them alone
            previous[n] = a["moved"][n] - theta[n]
            assert torch.equal(a["final"][n], a["moved"][n])
        assert sorted(a["grad_none"]) == sorted(PRECONDITIONED)
        assert a["state"] & set(PRECONDITIONED) == set()
        if step == 0:  # the skipped layer: SGD's step on its raw gradient (momentum buffer = g)
            for n in ("net.4.weight", "net.4.bias"):
                ref = theta[n] - LR * (grads[n] + WD * theta[n])
                assert torch.allclose(a["final"][n], ref, rtol=0, atol=1e-15)
                assert torch.equal(a["moved"][n], theta[n])


def test_callback_refuses_gradient_accumulation_with_a_clear_message():
    kfac = KFACCallback(step_rule="quadratic")
    trainer = _trainer([kfac], accumulate_grad_batches=2)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=1"):
        trainer.fit(Classifier().double(), _loader())
    with pytest.raises(MisconfigurationException, match="step_rule"):
        KFACCallback(step_rule="newton")
