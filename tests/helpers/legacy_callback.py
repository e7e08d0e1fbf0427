"""``KFACCallback`` with the original conventions for options a test leaves out (see legacy.py).

Separate from legacy.py so that engine-only tests do not import Lightning.
"""

from __future__ import annotations

from typing import Any

from lightning_kfac.callback import KFACCallback as _KFACCallback
from tests.helpers.legacy import _with_original


class KFACCallback(_KFACCallback):
    """The real callback (same class name, hence the same checkpoint state key) with
    ``tests.helpers.legacy.ORIGINAL`` for every option the caller does not set."""

    def __init__(self, config: Any = None, **options: Any) -> None:
        super().__init__(config, **_with_original(config, options))
