"""One-line errors for ``LightningCLI`` (jsonargparse) instead of a 90-line traceback.

jsonargparse checks types and names when it parses (``--trainer.callbacks.dampng=1`` or
``compute_method=bogus`` are parse errors), but values are checked by ``KFACConfig`` when the
callback is built, inside jsonargparse's instantiation, where an exception becomes a chained
traceback through jsonargparse and Lightning. The instantiator registered here builds the callback
as usual and turns its ``MisconfigurationException`` into the exit a parse error gets: one line
on stderr naming the option, the value and what is allowed, exit status 2.

Only jsonargparse's instantiation goes through it: ``KFACCallback(damping=-1)`` in Python still
raises ``MisconfigurationException``. Needs jsonargparse >= 4.49 (its global ``add_instantiator``);
with an older one, or without jsonargparse, nothing is registered.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from pytorch_lightning.utilities.exceptions import MisconfigurationException


def instantiate_or_exit(class_type: type, *args: Any, **kwargs: Any) -> Any:
    """Build ``class_type(*args, **kwargs)``; a configuration error exits with one line."""
    try:
        return class_type(*args, **kwargs)
    except MisconfigurationException as err:
        print(f"error: {class_type.__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def register(class_type: type) -> bool:
    """Register :func:`instantiate_or_exit` for ``class_type`` (and subclasses); True if done."""
    if importlib.util.find_spec("jsonargparse") is None:
        return False
    import jsonargparse

    add_instantiator = getattr(jsonargparse, "add_instantiator", None)
    if add_instantiator is None:  # jsonargparse < 4.49: per-parser instantiators only
        return False
    add_instantiator(instantiate_or_exit, class_type, subclasses=True)
    return True
