"""Compute method name -> class. Adding a method: one new file in this package (a ``Method``
subclass and its ``Decomposition`` dataclass, see base.py) and one line in ``METHODS``."""

from __future__ import annotations

from collections.abc import Mapping

from lightning_kfac.core.methods.base import Method
from lightning_kfac.core.methods.eigen import EigenMethod
from lightning_kfac.core.methods.ekfac import EKFACMethod
from lightning_kfac.core.methods.inverse import InverseMethod

METHODS: dict[str, type[Method]] = {
    EigenMethod.name: EigenMethod,
    InverseMethod.name: InverseMethod,
    EKFACMethod.name: EKFACMethod,
}

_INSTANCES: dict[str, Method] = {}


def method_names() -> tuple[str, ...]:
    """Every registered ``compute_method`` value."""
    return tuple(METHODS)


def register(method: type[Method]) -> type[Method]:
    """Add ``method`` under its ``name`` (usable as a class decorator); a name is taken once."""
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(
            f"Invalid compute method {method.name!r}: the name is already taken by "
            f"{METHODS[method.name].__name__}."
        )
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a registered method (tests that register their own)."""
    METHODS.pop(name, None)
    _INSTANCES.pop(name, None)


def method_for(name: object) -> Method:
    """The method instance for a ``compute_method`` value (a string or a string enum)."""
    key = str(getattr(name, "value", name))
    cls = METHODS.get(key)
    if cls is None:
        raise ValueError(f"Invalid compute_method={key!r}: must be one of {list(METHODS)}.")
    instance = _INSTANCES.get(key)
    if instance is None or type(instance) is not cls:
        instance = _INSTANCES[key] = cls()
    return instance


def method_of_state(state: Mapping[str, object]) -> Method | None:
    """The method a saved decomposition was built by, from its keys: the registered method with
    the fewest keys that holds them all (eigen's keys are a subset of EKFAC's); None for an
    empty decomposition (or one holding only the relative damping's scale)."""
    keys = set(state) - {"damping_scale"}
    if not keys:
        return None
    fits = [cls for cls in METHODS.values() if keys <= set(cls.decomposition_type.state_keys())]
    if not fits:
        raise ValueError(
            f"K-FAC: a saved decomposition with entries {sorted(state)} fits no "
            f"compute method ({list(METHODS)})."
        )
    return method_for(min(fits, key=lambda cls: len(cls.decomposition_type.state_keys())).name)
