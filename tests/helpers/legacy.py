"""The engine with the conventions most exactness tests were written against.

Those tests check the mathematics under the original conventions: absolute damping (``damping``
as given, 1e-3 unless the test sets it) and a first factor update that sets the factors to the
batch estimates. The defaults have since moved (relative damping 0.1, identity warm start;
docs/defaults.md); these subclasses fill in the original values for every option a test does
not set itself, so the tests keep checking the same formulas. Nothing else differs: they are
the real classes.
"""

from __future__ import annotations

from typing import Any

import lightning_kfac

ORIGINAL = {"damping": 1e-3, "damping_mode": "absolute", "factor_init": "batch"}


def _with_original(config: Any, options: dict) -> dict:
    if config is None:
        for key, value in ORIGINAL.items():
            options.setdefault(key, value)
    return options


class KFACPreconditioner(lightning_kfac.KFACPreconditioner):
    """``lightning_kfac.KFACPreconditioner`` with ``ORIGINAL`` for options the caller leaves out."""

    def __init__(self, model, config: Any = None, **options: Any):
        super().__init__(model, config, **_with_original(config, options))


def make_callback(config: Any = None, **options: Any) -> "lightning_kfac.KFACCallback":
    """A real ``KFACCallback`` with ``ORIGINAL`` for options the caller leaves out."""
    from lightning_kfac import KFACCallback

    return KFACCallback(config, **_with_original(config, options))
