"""Compatibility re-export: the Hydra schema lives in ``lightning_kfac.integrations.hydra``.

Kept so that code importing the old module path (``from lightning_kfac.hydra import
register_configs``) keeps working.
"""

from lightning_kfac.integrations.hydra import (
    CALLBACK_TARGET,
    SCHEMA_GROUP,
    SCHEMA_NAME,
    KFACSchema,
    register_configs,
)

__all__ = ["CALLBACK_TARGET", "SCHEMA_GROUP", "SCHEMA_NAME", "KFACSchema", "register_configs"]
