"""The Lightning adapter: :class:`KFACCallback` and the pieces it uses.

- ``callback.py``: ``KFACCallback`` (a ``pytorch_lightning.Callback``), hooks -> engine calls.
- ``unified.py``: the same callback, also a ``lightning.pytorch.Callback`` (for
  ``lightning.pytorch.cli.LightningCLI``).
- ``diagnostics_callback.py``: per-layer ``kfac_diag/*`` rows on diagnostic steps.
- ``training_step_rerun.py``: re-runs ``training_step`` on the step's batch (the loss after the
  step for adaptive damping; closures for ``step_rule="quadratic"``).
- ``cli_errors.py``: one-line ``LightningCLI`` errors for invalid options.

Importing this package imports ``pytorch_lightning``.
"""

from lightning_kfac.integrations.lightning.callback import KFACCallback, check_strategy

__all__ = ["KFACCallback", "check_strategy"]
