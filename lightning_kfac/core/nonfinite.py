"""How a step's pieces report a non-finite value to the engine, without holding the engine.

Numerical faults are survived, counted and reported: the piece that finds one (a factor estimate,
an EKFAC scaling, a preconditioned gradient) skips it and calls a ``NonfiniteReport`` with the
counter to raise, a per-layer key (one warning per key) and the message; the engine's policy
(``nonfinite="warn"`` or ``"raise"``) decides whether the message is a warning or an error.
"""

from __future__ import annotations

from typing import Protocol


class NonfiniteReport(Protocol):
    """``report(counter, key, message)``: count one fault in ``counter``, then warn once per
    ``key`` or raise ``FloatingPointError(message)``, as the engine's ``nonfinite`` option says."""

    def __call__(self, counter: str, key: str, message: str) -> None: ...
