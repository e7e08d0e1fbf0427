"""Fixtures of the reliability suite: the ``reliability_row`` recorder.

Every test here injects a fault into the real engine and records one row
``(row name, faults injected, faults survived, figure)``; ``tests/reliability_report.py`` prints
the rows as one table under ``make reliability``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.reliability_report import Row, record_row


@pytest.fixture
def reliability_row(request) -> Callable[[str, int, int, str], None]:
    """``reliability_row(name, injected, survived, figure)`` records this test's row."""

    def record(name: str, injected: int, survived: int, figure: str) -> None:
        record_row(
            request.config,
            Row(name, int(injected), int(survived), str(figure), request.node.nodeid),
        )

    return record


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
