"""Shared pieces of the KFACCallback tests (tests/integrations/lightning/); no tests here.

Tiny float64 models and deterministic data, a Trainer factory with everything optional switched
off, a hand-written K-FAC loop (the reference the callback must reproduce bit for bit), and a hook
counter.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_kfac import KFACPreconditioner


def make_trainer(tmp_path, **overrides) -> pl.Trainer:
    """A CPU Trainer with logging, checkpointing, progress bar, summary and validation off."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    options.update(overrides)
    return pl.Trainer(**options)


def make_dataset(
    n: int, d_in: int = 6, classes: int = 3, dtype=torch.float64, seed: int = 0
) -> TensorDataset:
    """Deterministic classification data: ``x`` ~ N(0, 1), labels from a fixed random projection."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = (x @ torch.randn(d_in, classes, generator=gen, dtype=dtype)).argmax(dim=1)
    return TensorDataset(x, y)


def loader(dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


class MLP(pl.LightningModule):
    """Linear -> Tanh -> Linear classifier (cross-entropy), float64 by default."""

    def __init__(
        self,
        d_in: int = 6,
        hidden: int = 8,
        classes: int = 3,
        lr: float = 0.1,
        optimizer: str = "sgd",
        dtype=torch.float64,
        seed: int = 0,
    ):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(
            dtype
        )
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        return self.loss(batch)

    def test_step(self, batch, batch_idx):
        return self.loss(batch)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return make_optimizer(self.optimizer_name, self.parameters(), self.lr)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"Invalid optimizer={name!r}: must be 'sgd', 'momentum' or 'adam'.")


def hand_loop(model: MLP, batches, steps: int, **kfac_options) -> KFACPreconditioner:
    """The reference: ``zero_grad; loss.backward(); pre.step(opt);
    opt.step()`` without Lightning."""
    model = model.train()
    pre = KFACPreconditioner(model, **kfac_options)
    optimizer = make_optimizer(model.optimizer_name, model.parameters(), model.lr)
    it = iter(batches)
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(next(it)).backward()
        pre.step(optimizer)
        optimizer.step()
    pre.remove()
    return pre


def clone_module(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def assert_params_equal(a: nn.Module, b: nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"parameter {name} differs"


def assert_factors_equal(
    fa: dict[str, tuple[Tensor, Tensor]], fb: dict[str, tuple[Tensor, Tensor]]
) -> None:
    assert fa.keys() == fb.keys() and fa
    for name in fa:
        assert torch.equal(fa[name][0], fb[name][0]), f"A of {name} differs"
        assert torch.equal(fa[name][1], fb[name][1]), f"G of {name} differs"


def count_hooks(module: nn.Module) -> int:
    """Forward, forward-pre and backward hooks on every submodule."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in module.modules()
    )


class Recorder(Callback):
    """Calls ``fn(trainer, pl_module)`` at every ``on_train_batch_end`` and keeps the results."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.records: list = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.records.append(self.fn(trainer, pl_module))


# -- probes for known engine bugs (reported; tests that hit them xfail only while they exist) ------
def engine_bug_autocast_capture() -> bool:
    """True while the capture hooks build ``a a^T`` inside autocast (bf16/fp16 factors)."""
    layer = nn.Linear(4, 2)
    pre = KFACPreconditioner(layer, factor_update_steps=1, inv_update_steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(8, 4))
    out.float().square().mean().backward()
    try:
        pre.step()
        bug = any(a.dtype != torch.float32 for a, _ in pre.factors().values())
    except RuntimeError:
        bug = True
    pre.remove()
    return bug


def engine_bug_step_drops_other_optimizers_layers() -> bool:
    """True while ``pre.step(opt_a)`` drops layers of another optimizer that have not run yet."""
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)})
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=1)
    x = torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("a", "b"):
            opt = torch.optim.SGD(model[name].parameters(), lr=0.1)
            pre.set_step(0)
            model[name](x).square().mean().backward()
            pre.step(opt)
    pre.remove()
    return set(pre.layers) != {"a", "b"}
