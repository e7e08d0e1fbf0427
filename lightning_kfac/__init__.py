"""lightning-kfac: K-FAC second-order preconditioning for PyTorch Lightning in one line.

    trainer = Trainer(callbacks=[KFACCallback()])

``KFACPreconditioner`` is the same engine for plain PyTorch loops; ``KFACConfig`` holds every
option; ``register_layer`` adds a layer type (docs/layers.md). Importing this package does not
import Hydra; Lightning is imported lazily, only when ``KFACCallback`` is first accessed.
"""

from lightning_kfac.config import KFACConfig
from lightning_kfac.core.coverage import KFACCoverageWarning
from lightning_kfac.core.layers import LayerKind, register_layer, unregister_layer
from lightning_kfac.preconditioner import KFACOptimizer, KFACPreconditioner

__all__ = [
    "KFACCallback",
    "KFACConfig",
    "KFACCoverageWarning",
    "KFACOptimizer",
    "KFACPreconditioner",
    "LayerKind",
    "register_layer",
    "unregister_layer",
]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "KFACCallback":
        from lightning_kfac.integrations.lightning.callback import KFACCallback

        return KFACCallback
    raise AttributeError(f"module 'lightning_kfac' has no attribute {name!r}")
