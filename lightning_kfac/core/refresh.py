"""Watching a decomposition refresh: float64 retries counted and logged, slow refreshes reported.

A refresh decomposes every due layer's factors (O(d^3) each). On a large CNN that can take
minutes on one CPU thread, and a float32 ``eigh`` that fails to converge used to be redone in
float64 without a word. ``RefreshMonitor`` wraps each layer's decomposition:

- a ``linalg.DecompositionRetryWarning`` raised inside it is counted (``retries``) and logged
  with the layer's name on the ``lightning_kfac`` logger (WARNING), every time;
- the layer's time is measured (``layer_seconds``); once a refresh has run longer than
  ``report_after`` seconds, each further layer is logged (INFO: layer, its size, its time and the
  refresh's elapsed time), and the refresh's end is logged with its total and slowest layer, so
  a user never watches a silent minute.

The ``lightning_kfac`` logger gets a stderr handler at INFO when the application configured no
logging at all (as Lightning does for its own logger); otherwise it propagates as usual.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from lightning_kfac.core.linalg import DecompositionRetryWarning

logger = logging.getLogger("lightning_kfac")
_Result = TypeVar("_Result")  # what the timed decomposition returns
if not logging.getLogger().hasHandlers() and not logger.handlers:
    logger.setLevel(logging.INFO)
    logger.addHandler(logging.StreamHandler())
    logger.propagate = False

#: A refresh running longer than this (seconds of wall time) reports each layer it finishes.
REPORT_AFTER_S = 3.0


class RefreshMonitor:
    """Times and watches the per-layer decompositions of one preconditioner's refreshes."""

    def __init__(self, report_after: float = REPORT_AFTER_S):
        self.report_after = float(report_after)
        self.retries = 0  # float64 retries over the preconditioner's life
        self.layer_seconds: dict[str, float] = {}  # last decomposition time of each layer (wall)
        self.layer_cpu_seconds: dict[str, float] = {}  # the same, CPU time of this thread
        self.last_refresh_seconds = 0.0
        self._start: float | None = None
        self._step = 0
        self._done: list[tuple[str, float]] = []
        self._total = 0
        self._reported = False

    def begin(self, step: int, layers: int) -> None:
        """A refresh of ``layers`` layers starts at optimizer step ``step``."""
        self._start, self._step, self._total = time.perf_counter(), step, layers
        self._done, self._reported = [], False

    def run(self, block: Any, fn: Callable[[Any], _Result]) -> _Result:
        """``fn(block)`` with its retry warnings counted and logged, and its time recorded."""
        if self._start is None:
            self.begin(self._step, 1)
        start, cpu = time.perf_counter(), time.thread_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DecompositionRetryWarning)
            try:
                return fn(block)
            finally:
                self.layer_cpu_seconds[block.name] = time.thread_time() - cpu
                self._finish_layer(block, time.perf_counter() - start, caught)

    def end(self) -> None:
        """The refresh is over: log its total when it was slow enough to report."""
        if self._start is None:
            return
        total = time.perf_counter() - self._start
        self.last_refresh_seconds = total
        if self._reported and self._done:
            name, slowest = max(self._done, key=lambda item: item[1])
            logger.info(
                "K-FAC refresh at step %d: %d layers decomposed in %.1f s (slowest: %s, %.1f s)",
                self._step,
                len(self._done),
                total,
                name,
                slowest,
            )
        self._start = None

    def _finish_layer(
        self, block: Any, seconds: float, caught: list[warnings.WarningMessage]
    ) -> None:
        self.layer_seconds[block.name] = seconds
        self._done.append((block.name, seconds))
        for record in caught:
            if issubclass(record.category, DecompositionRetryWarning):
                self.retries += 1
                logger.warning(
                    "K-FAC: layer %r at step %d: %s (retry %d of this run)",
                    block.name,
                    self._step,
                    record.message,
                    self.retries,
                )
            else:  # not ours: hand it on unchanged
                warnings.warn_explicit(
                    record.message,
                    record.category,
                    record.filename,
                    record.lineno,
                    source=record.source,
                )
        assert self._start is not None  # run() began the refresh
        elapsed = time.perf_counter() - self._start
        if elapsed > self.report_after:
            if not self._reported:
                logger.info(
                    "K-FAC refresh at step %d is slow (%d layers due); reporting progress",
                    self._step,
                    self._total,
                )
            self._reported = True
            a, g = block.kind.a_dim(), block.kind.g_dim()
            logger.info(
                "K-FAC refresh at step %d: layer %d/%d %s (A %d, G %d) took %.1f s, %.1f s elapsed",
                self._step,
                len(self._done),
                self._total,
                block.name,
                a,
                g,
                seconds,
                elapsed,
            )
