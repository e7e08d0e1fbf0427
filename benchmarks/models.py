"""Benchmark models (self-contained; the demos in examples/ are separate on purpose).

- ``mlp``: 784-1000-500-250-10 ReLU classifier.
- ``autoencoder``: Martens & Grosse (2015, sec. 13) deep autoencoder
  784-1000-500-250-30-250-500-1000-784, logistic units, linear code layer; with
  ``sparse_init`` the M&G initialization: each unit gets ``nonzero`` incoming weights drawn from
  N(0, 1), the rest and all biases zero.
- ``cnn``: conv 3->32 (3x3) - ReLU - max-pool 2 - conv 32->64 (3x3) - ReLU - average-pool to
  4x4 - linear 1024->10, on 3x32x32 inputs.
- ``digits_autoencoder`` / ``digits_mlp``: the same families sized for scikit-learn's 8x8 digits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn


def mlp(sizes: Sequence[int] = (784, 1000, 500, 250, 10), act=nn.ReLU) -> nn.Sequential:
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def sparse_init_(model: nn.Module, nonzero: int = 15, generator: torch.Generator = None) -> None:
    """M&G sparse initialization: ``nonzero`` N(0,1) incoming weights per unit, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                w = torch.zeros_like(module.weight)
                k = min(nonzero, w.shape[1])
                for row in range(w.shape[0]):
                    cols = torch.randperm(w.shape[1], generator=generator)[:k]
                    w[row, cols] = torch.randn(k, generator=generator)
                module.weight.copy_(w)
                if module.bias is not None:
                    module.bias.zero_()


def autoencoder(
    encoder: Sequence[int] = (784, 1000, 500, 250, 30),
    sparse_init: bool = False,
    generator: torch.Generator = None,
    act=nn.Sigmoid,
) -> nn.Sequential:
    """``act`` (default sigmoid) encoder/decoder with a linear code layer; outputs logits (use
    BCE with logits)."""
    sizes = list(encoder) + list(reversed(encoder[:-1]))
    code = len(encoder) - 2  # index of the code layer (linear, no activation)
    layers = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(d_in, d_out))
        if i != code and i < len(sizes) - 2:
            layers.append(act())
    model = nn.Sequential(*layers)
    if sparse_init:
        sparse_init_(model, generator=generator)
    return model


def cnn(channels: Sequence[int] = (3, 32, 64), image: int = 32, classes: int = 10) -> nn.Sequential:
    c0, c1, c2 = channels
    pooled = 4 if image >= 16 else 2
    return nn.Sequential(
        nn.Conv2d(c0, c1, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pooled),
        nn.Flatten(),
        nn.Linear(c2 * pooled * pooled, classes),
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
