"""K-FAC in a plain PyTorch loop (no Lightning): a small MLP on scikit-learn's digits.

    python examples/plain_pytorch.py [--steps 200] [--damping 0.01]

Trains the same model (same seed, same batches, same SGD) twice, without and with
``KFACPreconditioner``, and prints both training losses. The only change K-FAC needs in a loop::

    pre = KFACPreconditioner(model, damping=1e-2)
    loss.backward()
    pre.step(optimizer)        # grad <- (A (x) G + damping I)^-1 grad, layer by layer
    optimizer.step()
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from examples.data import load_digits_tensors  # noqa: E402
from lightning_kfac import KFACPreconditioner  # noqa: E402


def make_model() -> nn.Module:
    """64 -> 64 -> 10 ReLU MLP (logits)."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(
    use_kfac: bool,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 0.05,
    damping: float = 1e-2,
    seed: int = 0,
) -> list[float]:
    """Train with SGD (momentum 0.9), optionally K-FAC-preconditioned; returns per-step losses."""
    x, y, _, _ = load_digits_tensors()
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    pre = KFACPreconditioner(model, damping=damping) if use_kfac else None
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    while len(losses) < steps:
        perm = torch.randperm(len(x), generator=order)
        for idx in perm.split(batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            if pre is not None:
                pre.step(optimizer)
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    if pre is not None:
        pre.remove()
    return losses


def final_loss(losses: Sequence[float], window: int = 20) -> float:
    """Mean of the last ``window`` step losses (mini-batch losses are noisy)."""
    tail = list(losses)[-window:]
    return sum(tail) / len(tail)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="SGD vs K-FAC + SGD on the digits, plain PyTorch")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--damping", type=float, default=1e-2, help="K-FAC damping")
    args = parser.parse_args(argv)
    results = {}
    for name, use_kfac in (("SGD", False), ("K-FAC + SGD", True)):
        losses = train(use_kfac, steps=args.steps, lr=args.lr, damping=args.damping)
        results[name] = final_loss(losses)
        print(
            f"{name:12s} training loss after {args.steps} steps: {results[name]:.4f} "
            f"(mean of the last 20 steps)"
        )
    return results


if __name__ == "__main__":
    main()
