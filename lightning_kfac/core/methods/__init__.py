"""Compute methods (eigen, inverse, EKFAC) as classes behind one interface (base.py), chosen
once per layer through the registry (``method_for``)."""

from lightning_kfac.core.methods.base import Decomposition, Layout, Method
from lightning_kfac.core.methods.registry import (
    METHODS,
    method_for,
    method_names,
    method_of_state,
    register,
)

__all__ = [
    "METHODS",
    "Decomposition",
    "Layout",
    "Method",
    "method_for",
    "method_names",
    "method_of_state",
    "register",
]
