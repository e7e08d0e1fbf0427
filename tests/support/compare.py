"""Comparisons of nested results (dicts / lists / tensors) gathered from ranks or runs."""

from __future__ import annotations

import torch


def nested_equal(a, b) -> bool:
    """Bitwise equality (``torch.equal``) of two nested dict / list / tuple / tensor structures."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b
