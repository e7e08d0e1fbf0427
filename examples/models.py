"""LightningModules for the digits examples. None of them knows about K-FAC.

K-FAC is added from the outside (``Trainer(callbacks=[KFACCallback(...)])``); the modules are
ordinary Lightning code. The optimizer comes in as a partial (Hydra's ``_partial_: true``):
``configure_optimizers`` calls it on ``self.parameters()``.

- :class:`DeepAutoencoder`: the deep autoencoder benchmark of Hinton & Salakhutdinov (2006) used
  by Martens & Grosse (2015, sec. 13), scaled to 64-pixel digits.
- :class:`MLPClassifier`: 64 -> ReLU layers -> 10 logits, cross-entropy, test accuracy.
- :class:`CNNClassifier`: Conv2d layers on the 1x8x8 images and a Linear head.

Logged metrics: ``train/loss`` every step; ``test/loss`` and ``test/mse`` (autoencoder) or
``test/acc`` (classifiers) on the held-out split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def sparse_init_(linear: nn.Linear, nonzero: int = 15) -> nn.Linear:
    """Martens' (2010) sparse initialization, used by Martens & Grosse (2015, sec. 13).

    Every unit (row of ``weight``) gets ``min(nonzero, fan_in)`` nonzero incoming weights drawn
    from N(0, 1) at random positions; all other weights and the bias are zero. Unlike a dense
    small-variance init, units start with distinct, saturation-free inputs, which lets the
    optimizer leave the plateau where the autoencoder predicts the mean image.
    """
    out_features, in_features = linear.weight.shape
    k = min(int(nonzero), in_features)
    with torch.no_grad():
        positions = torch.rand(out_features, in_features).argsort(dim=1)[:, :k]
        weight = torch.zeros(out_features, in_features)
        weight.scatter_(1, positions, torch.randn(out_features, k))
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


class _DigitsModule(pl.LightningModule):
    """Shared plumbing: the optimizer partial and step-wise loss logging."""

    def __init__(self, optimizer: OptimizerFactory | None = None):
        super().__init__()
        self.optimizer_factory = optimizer or partial(torch.optim.SGD, lr=0.1, momentum=0.9)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_factory(self.parameters())

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def loss(self, batch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class DeepAutoencoder(_DigitsModule):
    """Deep autoencoder ``64-128-64-32-16-32-64-128-64`` (M&G 2015 sec. 13, scaled to digits).

    Logistic (sigmoid) hidden units, a linear code layer, and logits out; the loss is the
    Bernoulli cross-entropy summed over the 64 pixels and averaged over images,
    ``L = (1/N) sum_n sum_p BCE(sigmoid(z_np), x_np)`` (pixel intensities in [0, 1] as targets),
    as in the paper's per-case objective. ``sparse_init`` (default 15) selects Martens' sparse
    initialization; ``None`` keeps PyTorch's default (which sits on the mean-image plateau for
    hundreds of steps).
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dims: Sequence[int] = (128, 64, 32),
        code_dim: int = 16,
        sparse_init: int | None = 15,
        optimizer: OptimizerFactory | None = None,
    ):
        super().__init__(optimizer)
        hidden_dims = [int(h) for h in hidden_dims]
        self.save_hyperparameters(ignore=["optimizer"])
        dims = [input_dim, *hidden_dims, code_dim]
        self.encoder = self._stack(dims)  # last layer (the code) is linear
        self.decoder = self._stack(dims[::-1])  # last layer gives the pixel logits
        if sparse_init is not None:
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    sparse_init_(module, sparse_init)

    @staticmethod
    def _stack(dims: Sequence[int]) -> nn.Sequential:
        layers: list = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.Sigmoid())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel logits of the reconstruction."""
        return self.decoder(self.encoder(x))

    def loss(self, batch) -> torch.Tensor:
        x, _ = batch
        logits = self(x)
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()

    def test_step(self, batch, batch_idx):
        x, _ = batch
        logits = self(x)
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1).mean()
        mse = (torch.sigmoid(logits) - x).pow(2).sum(1).mean()
        self.log("test/loss", bce, sync_dist=True)
        self.log("test/mse", mse, sync_dist=True)  # squared error per image (M&G's figure)


class _Classifier(_DigitsModule):
    def __init__(self, num_classes: int, optimizer: OptimizerFactory | None):
        super().__init__(optimizer)
        self.test_acc = MulticlassAccuracy(
            num_classes=num_classes, average="micro"
        )  # share correct

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("test/acc", self.test_acc)


class MLPClassifier(_Classifier):
    """``64 -> hidden_dims (ReLU) -> num_classes`` logits, cross-entropy loss."""

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dims: Sequence[int] = (128, 64),
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
    ):
        super().__init__(num_classes, optimizer)
        hidden_dims = [int(h) for h in hidden_dims]
        self.save_hyperparameters(ignore=["optimizer"])
        dims = [input_dim, *hidden_dims]
        layers: list = []
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNNClassifier(_Classifier):
    """Conv2d(1->c1, 3x3) -> ReLU -> Conv2d(c1->c2, 3x3, stride 2) -> ReLU
    -> Linear(c2*4*4 -> 10)."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        num_classes: int = 10,
        optimizer: OptimizerFactory | None = None,
    ):
        super().__init__(num_classes, optimizer)
        channels = [int(c) for c in channels]
        if len(channels) != 2:
            raise ValueError(f"Invalid channels={channels!r}: must be two output-channel counts.")
        self.save_hyperparameters(ignore=["optimizer"])
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))
