"""Re-run ``training_step`` on the step's batch: the loss after the step, and step-rule closures.

Two users in ``KFACCallback``: adaptive damping (the loss after the update, below) and
``step_rule="quadratic"`` (:func:`lightning_closure`, which re-runs ``training_step`` for the
exact curvature products of ``step_rule.py``; logging silenced the same way).

Adaptive damping in Lightning: re-evaluate the training loss on the same batch after a step.

The Levenberg-Marquardt rule (Martens & Grosse 2015, sec. 6.5; ``core/damping.py``) needs the
loss before and after the update on the batch that produced the gradient. ``KFACCallback`` calls
:func:`adapt_damping` from ``on_train_batch_end`` (after the optimizer step) on the adaptation
steps only. The loss before is the ``training_step`` output Lightning passes to that hook (times
``accumulate_grad_batches``, which Lightning divided it by); the loss after is one more call of
``training_step(batch, batch_idx)``:

- under ``torch.no_grad()`` and the precision plugin's ``train_step_context()`` (same autocast as
  training; the capture hooks stay silent without grad),
- with ``self.log`` / ``self.log_dict`` silenced (no duplicate metrics, epoch means unaffected),
- with every buffer restored afterwards (BatchNorm running statistics move once per batch),
- inside ``torch.random.fork_rng``, so the RNG streams of training are untouched (dropout in the
  re-evaluation draws other masks than the training forward: rho is then noisier).

With gradient accumulation both losses are those of the step's last micro-batch. Under DDP the
engine averages both losses over ranks, so every rank takes the same decision. Manual
optimization is refused by the callback (``training_step`` would step the optimizers again).
No Lightning import here: the module and trainer are used through their public attributes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # the annotations only; at runtime the module is used by its attributes
    import pytorch_lightning as pl


def _silent(*args: Any, **kwargs: Any) -> None:
    return None


def step_loss(output: Any) -> float:
    """The loss in a ``training_step`` output (a tensor or a mapping with "loss"); nan if none."""
    if isinstance(output, Mapping):
        output = output.get("loss")
    if isinstance(output, Tensor) and output.numel() == 1:
        return float(output.detach())
    return math.nan


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[nn.Module]:
    """``module.log`` / ``module.log_dict`` do nothing inside (a re-run logs no duplicates)."""
    shadowed = {
        name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__
    }
    for name in ("log", "log_dict"):
        setattr(module, name, _silent)
    try:
        yield module
    finally:
        for name in ("log", "log_dict"):
            if name in shadowed:
                module.__dict__[name] = shadowed[name]
            else:
                del module.__dict__[name]


def training_loss(
    module: pl.LightningModule, batch: Any, batch_idx: int, context: Any = None
) -> float:
    """``module.training_step(batch, batch_idx)``'s loss, with no side effects (see module doc)."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    try:
        with (
            silenced_logging(module),
            torch.random.fork_rng(devices=devices),
            torch.no_grad(),
            context if context is not None else contextlib.nullcontext(),
        ):
            output = module.training_step(batch, batch_idx)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return step_loss(output)


def adapt_damping(
    pre: Any, trainer: Any, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
) -> float | None:
    """Run the LM update after an adaptation step; rho, or None when none is pending."""
    if not pre.adaptation_pending:
        return None
    before = step_loss(outputs) * trainer.accumulate_grad_batches
    if not math.isfinite(before):  # training_step returned no loss: nothing to compare
        rho: float | None = pre.update_damping(before, before)
        return rho
    context = trainer.precision_plugin.train_step_context()
    rho = pre.update_damping(before, lambda: training_loss(module, batch, batch_idx, context))
    return rho


def lightning_closure(module: pl.LightningModule, batch: Any, batch_idx: int) -> Callable[[], Any]:
    """A closure that re-runs ``module.training_step(batch, batch_idx)`` with logging silenced."""

    def closure() -> Any:
        with silenced_logging(module):
            return module.training_step(batch, batch_idx)

    return closure
