"""``KFACCallback`` for the unified ``lightning`` package (``lightning.pytorch``).

``pytorch_lightning`` and ``lightning.pytorch`` ship the same classes twice under two names. A
``Trainer`` calls callback hooks by name, so :class:`lightning_kfac.KFACCallback` (a
``pytorch_lightning.Callback``) already runs in either package's Trainer; but
``lightning.pytorch.cli.LightningCLI`` accepts only subclasses of *its* ``Callback`` by import
path. This class is the same callback, also a ``lightning.pytorch.Callback``:

    pytorch_lightning.cli.LightningCLI:
        --trainer.callbacks+=lightning_kfac.KFACCallback
    lightning.pytorch.cli.LightningCLI:
        --trainer.callbacks+=lightning_kfac.integrations.lightning.unified.KFACCallback

Same signature, options, behaviour and checkpoint state key as ``lightning_kfac.KFACCallback``.
Importing this module imports both ``lightning`` and ``pytorch_lightning``.
"""

from __future__ import annotations

from lightning.pytorch import Callback as _UnifiedCallback

from lightning_kfac.integrations.lightning.callback import KFACCallback as _KFACCallback


# mypy sees two unrelated Callback classes whose hooks name different Trainer types; at runtime
# both packages' Trainers call the hooks by name with their own objects.
class KFACCallback(_KFACCallback, _UnifiedCallback):  # type: ignore[misc]
    __doc__ = _KFACCallback.__doc__


__all__ = ["KFACCallback"]
