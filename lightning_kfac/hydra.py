"""Compatibility re-export: the Hydra schema lives in ``lightning_kfac.integrations.hydra``.

Kept so that code importing the old module path (``from lightning_kfac.hydra import
register_configs``) keeps working.
"""

from lightning_kfac.integrations.hydra import *  # noqa: F401,F403
