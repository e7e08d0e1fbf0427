"""KFACOptimizer: an optimizer-like wrapper whose ``step()`` preconditions, then steps.

For plain PyTorch loops that want one call per step::

    opt = KFACPreconditioner(model).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    loss.backward(); opt.step(); opt.zero_grad()

``step()`` is one transaction with the inner optimizer's step: when that raises, the K-FAC step is
undone (core/transaction.py), so running the batch again does not count its factors twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the engine imports this module (re-export); no import cycle at runtime
    from lightning_kfac.preconditioner import KFACPreconditioner


class KFACOptimizer:
    """Optimizer wrapper for plain PyTorch: ``step()`` preconditions, then steps the inner one.

    Example:
        >>> opt = KFACPreconditioner(model).wrap(torch.optim.SGD(model.parameters(), lr=0.1))
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, preconditioner: KFACPreconditioner, optimizer: torch.optim.Optimizer):
        self.preconditioner = preconditioner
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition, then step the inner optimizer; if that raises, the K-FAC step is undone
        (core/transaction.py), so running the batch again does not count its factors twice."""
        if closure is not None:
            raise ValueError(
                "Invalid closure: KFACOptimizer needs the gradients before step(); "
                "call loss.backward() first and step() without a closure."
            )
        pre = self.preconditioner
        kept, pre.undoable = pre.undoable, True
        try:
            pre.step(self.optimizer)
            try:
                result = self.optimizer.step()
            except BaseException:
                pre.abort_step(pre.steps - 1)
                raise
            pre.commit_step()
        finally:
            pre.undoable = kept
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "kfac": self.preconditioner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.preconditioner.load_state_dict(state["kfac"])
