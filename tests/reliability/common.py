"""Small models, deterministic data and a fault injector shared by the reliability tests.

``Inject`` is an identity module placed after an activation; a test switches it to corrupt the
forward activation (``act``) or the gradient flowing back through it (``grad``) with NaN, inf or
a finite spike (a float multiplier), so faults reach the real engine through real autograd.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

Fault = str | float | None


def _corrupt(x: Tensor, fault: Fault) -> Tensor:
    if fault is None:
        return x
    if fault == "nan":
        return x.clone().index_fill_(-1, torch.tensor([0]), float("nan"))
    if fault == "inf":
        return x.clone().index_fill_(-1, torch.tensor([0]), float("inf"))
    return x * float(fault)  # a finite spike


class _InjectFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return _corrupt(x, module.act)

    @staticmethod
    def backward(ctx, grad):
        return _corrupt(grad, ctx.module.grad), None


class Inject(nn.Module):
    """Identity, unless ``act``/``grad`` is set ("nan", "inf" or a float multiplier)."""

    def __init__(self) -> None:
        super().__init__()
        self.act: Fault = None
        self.grad: Fault = None

    def forward(self, x: Tensor) -> Tensor:
        return _InjectFn.apply(x, self)

    def clear(self) -> None:
        self.act = self.grad = None


LAYERS = ["fc0", "fc1", "fc2"]


def mlp(
    seed: int = 0,
    d_in: int = 6,
    hidden: int = 8,
    classes: int = 3,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """fc0 -> tanh -> inj0 -> fc1 -> tanh -> inj1 -> fc2 (injectors after the activations)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            [
                ("fc0", nn.Linear(d_in, hidden)),
                ("act0", nn.Tanh()),
                ("inj0", Inject()),
                ("fc1", nn.Linear(hidden, hidden)),
                ("act1", nn.Tanh()),
                ("inj1", Inject()),
                ("fc2", nn.Linear(hidden, classes)),
            ]
        )
    ).to(dtype)


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Two 3x3 convolutions and a linear head on 1 x 8 x 8 inputs (10 classes)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            [
                ("conv0", nn.Conv2d(1, 4, 3)),
                ("relu0", nn.ReLU(inplace=True)),
                ("conv1", nn.Conv2d(4, 6, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("flat", nn.Flatten()),
                ("fc", nn.Linear(6 * 6 * 6, 10)),
            ]
        )
    ).to(dtype)


def batch(
    t: int,
    n: int = 16,
    shape: tuple[int, ...] = (6,),
    classes: int = 3,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """The batch of step ``t``: a pure function of (seed, t), so replays are bit-identical."""
    gen = torch.Generator().manual_seed(10_000 * seed + t)
    return (
        torch.randn(n, *shape, generator=gen, dtype=dtype),
        torch.randint(0, classes, (n,), generator=gen),
    )


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def factors_finite(pre) -> bool:
    return all_finite([t for a_g in pre.factors().values() for t in a_g])


def snapshot(pre) -> dict[str, tuple[Tensor, Tensor]]:
    return pre.factors()
