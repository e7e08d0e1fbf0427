"""Compatibility re-export: the unified-``lightning`` callback lives in
``lightning_kfac.integrations.lightning.unified``.

Kept so that the old class path ``lightning_kfac.lightning.KFACCallback`` (e.g. in a
``LightningCLI`` config) keeps working. Importing it imports ``lightning`` and
``pytorch_lightning``.
"""

from lightning_kfac.integrations.lightning.unified import KFACCallback

__all__ = ["KFACCallback"]
