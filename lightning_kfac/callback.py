"""Compatibility re-export: ``KFACCallback`` lives in
``lightning_kfac.integrations.lightning.callback``.

Kept so that code importing the old module path (``from lightning_kfac.callback import
KFACCallback``) keeps working; new code imports ``lightning_kfac.KFACCallback``.
"""

from lightning_kfac.integrations.lightning.callback import (
    CALLBACK_ONLY_OPTIONS,
    KFACCallback,
    check_strategy,
)

__all__ = ["CALLBACK_ONLY_OPTIONS", "KFACCallback", "check_strategy"]
