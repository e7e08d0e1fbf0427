"""A user's LightningCLI script, for tests/integrations/lightning/test_lightning_cli.py
(run as a subprocess).

    python tests/cli_scripts/boring_cli.py {pytorch_lightning|lightning} fit [LightningCLI args]

Fits Lightning's BoringModel on BoringDataModule; after the run, prints one JSON line
``KFAC_RESULT {...}`` with each KFACCallback's config and K-FAC step count, so the test can check
what the run really used.
"""

import json
import sys

package, args = sys.argv[1], sys.argv[2:]
if package == "lightning":
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
else:
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.demos.boring_classes import BoringDataModule, BoringModel

cli = LightningCLI(BoringModel, BoringDataModule, args=args)
found = [
    {
        "class": f"{type(cb).__module__}.{type(cb).__name__}",
        "config": cb.config.to_dict(),
        "steps": cb.preconditioner.steps if cb.preconditioner is not None else 0,
    }
    for cb in cli.trainer.callbacks
    if hasattr(cb, "preconditioner")
]
print("KFAC_RESULT " + json.dumps(found))
