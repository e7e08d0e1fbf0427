"""Which optimizers K-FAC can drive: every ``step(closure=None)`` optimizer, not closure-based ones.

K-FAC replaces ``p.grad`` of one forward/backward pass by ``(A (x) G + damping I)^-1 grad``
before ``optimizer.step()``. An optimizer whose ``step`` *requires* a closure
(``torch.optim.LBFGS``, line-search methods) re-evaluates the loss and the gradients several
times inside one step, overwriting the preconditioned gradient and capturing factors from its
inner evaluations, so it is refused with a ``ValueError`` naming the optimizer. The callback
re-raises it as Lightning's ``MisconfigurationException``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _closure_required(cls: type[Any]) -> bool:
    try:
        params = inspect.signature(cls.step).parameters
    except (TypeError, ValueError):  # a builtin / C step without a signature: assume no closure
        return False
    closure = params.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def closure_required(optimizer: object) -> bool:
    """True when ``type(optimizer).step`` has a ``closure`` argument without a default."""
    # a class is hashable (type.__hash__); mypy matches type[...] against Hashable wrongly
    return _closure_required(type(optimizer))  # type: ignore[arg-type]


def check_optimizer(optimizer: Any) -> None:
    """Raise ``ValueError`` for optimizers K-FAC cannot precondition (closure-based ones)."""
    if optimizer is not None and closure_required(optimizer):
        name = type(optimizer).__name__
        raise ValueError(
            f"Invalid optimizer={name}: its step(closure) re-evaluates the loss and gradients "
            "several times per step, which would overwrite the K-FAC preconditioned gradient. "
            "Use an optimizer whose step() needs no closure (SGD, Adam, AdamW, ...)."
        )
